"""The work evaluation costs, counted: each model runs over each record once per
evaluation, no wider than its batch's longest record, and the base model's scores are
taken once per study (kept on disk, so a rerun does not run the base model again); and
the figures from those shared, trimmed passes equal those of one record at a time."""

import collections
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from privtune.attacks.mia import score_attacks
from privtune.config import parse_config
from privtune.data.tokenize import encode_records
from privtune.measures.leakage import leakage_measures
from privtune.measures.token_scores import score_tokens
from privtune.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from privtune.study import stages
from privtune.study.driver import open_store, run_study
from privtune.study.score_cache import ScoreCache
from privtune.train.precision import Runtime

CPU = Runtime(torch.device("cpu"), "fp32")


@contextmanager
def counted_passes():
    """Rows and tokens through a model's input embedding, per (run, stage): one row per
    record a forward pass reads, whatever calls it."""
    counts = collections.defaultdict(lambda: [0, 0])

    def count(module, args):
        if isinstance(module, torch.nn.Embedding) and args and args[0].dtype == torch.long and args[0].dim() == 2:
            timer = stages._current
            key = (timer.run if timer else None, timer._open[-1] if timer and timer._open else stages.OTHER)
            counts[key][0] += args[0].shape[0]
            counts[key][1] += args[0].numel()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        yield counts
    finally:
        handle.remove()


def study(tmp_path, methods):
    return parse_config({
        "name": "passes", "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        # max_length well above the records' lengths, so they differ and padding would show
        "data": {"source": "customer-sim", "n_individuals": 8, "max_length": 512},
        "canaries": {"enabled": False},
        "attacks": {"extraction": {"enabled": False}},
        "train": {"epochs": 2, "batch_size": 4, "physical_batch_size": 4, "lr": 1e-3},
        "methods": methods, "precision": "fp32", "eval_batch_size": 3,
    })


def padded_tokens(lengths, batch_size):
    """Tokens a pass reads when records go longest first, each batch as wide as its longest."""
    ordered = sorted(lengths, reverse=True)
    return sum(len(ordered[i:i + batch_size]) * ordered[i] for i in range(0, len(ordered), batch_size))


def test_each_record_runs_once_per_evaluation_and_the_base_once_per_study(tmp_path):
    fft, lora = {"method": "fft"}, {"method": "lora", "lr": 1e-2, "lora": {"r": 2}}
    with counted_passes() as first:
        assert run_study(study(tmp_path, [fft]), show_progress=False).failed == {}
    from privtune.study.runner import StudyContext

    data = StudyContext.build(study(tmp_path, [fft])).data
    n = len(data.members) + len(data.nonmembers)
    lengths = [int(x) for d in (data.members, data.nonmembers) for x in d.attention_mask.sum(dim=1)]
    one_pass = padded_tokens(lengths[:len(data.members)], 3) + padded_tokens(lengths[len(data.members):], 3)
    assert max(lengths) < 512 and min(lengths) < max(lengths)  # padding there to be cut
    # The base model: one pass over every record, no column past its batch's longest record.
    assert first[("base", "base model scores")] == [n, one_pass]
    # The trained model: one pass per record after each of its 2 epochs; the membership
    # attacks and per-record statistics read those scores and run nothing.
    assert first[("fft", "measures")] == [2 * n, 2 * one_pass]
    for stage in ("membership attacks", "record stats", "base model scores"):
        assert first.get(("fft", stage), [0, 0]) == [0, 0]

    # A rerun with a method added (a fresh context, as a new process has) reads the base
    # model's scores from disk and runs only the new model.
    with counted_passes() as second:
        outcome = run_study(study(tmp_path, [fft, lora]), show_progress=False)
    assert outcome.done == ["lora"] and outcome.failed == {}
    assert {stage for run, stage in second if run == "lora"} >= {"measures", "training"}
    assert second.get(("lora", "base model scores"), [0, 0]) == [0, 0]
    store = open_store(study(tmp_path, [fft, lora]))
    runs = {r["label"]: r for r in store.runs("passes")}
    store.close()
    assert runs["lora"]["final"]["leakage_gain"] == pytest.approx(
        runs["base"]["final"]["ce_s_train"] - runs["lora"]["final"]["ce_s_train"], abs=1e-9)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_trimmed_scores_give_the_figures_of_one_record_at_a_time(family):
    """Length-sorted batches cut to their longest record: the same per-token scores,
    leakage measures and attack scores as records scored alone (fp32, within 1e-5)."""
    from privtune.data.corpora import generate_corpus

    records = generate_corpus("customer-sim", n_individuals=6, seed=1)
    members, nonmembers = records[: len(records) // 2], records[len(records) // 2:]
    tok = tiny_tokenizer()
    sets = [encode_records(part, tok, max_length=400) for part in (members, nonmembers)]
    target, base = tiny_model(family, seed=1), tiny_model(family, seed=2)
    batched = {m: [score_tokens(model, d, CPU, batch_size=4) for d in sets] for m, model in (("t", target), ("b", base))}
    alone = {m: [score_tokens(model, d, CPU, batch_size=1) for d in sets] for m, model in (("t", target), ("b", base))}
    for m in batched:
        for got, want in zip(batched[m], alone[m]):
            for field in ("nll", "mu", "sigma"):
                np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=1e-5, rtol=1e-5)
            assert np.array_equal(got.valid, want.valid) and np.array_equal(got.sensitive, want.sensitive)
    got, want = (leakage_measures(*s["t"], *s["b"]) for s in (batched, alone))
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5, nan_ok=True)  # ppl: exp(CE)
    got, want = (score_attacks(*s["t"], *s["b"], members, nonmembers, base=tuple(s["b"])) for s in (batched, alone))
    assert [(e["attack"], e["level"]) for e in got] == [(e["attack"], e["level"]) for e in want]
    for a, b in zip(got, want):
        assert a["auc"] == pytest.approx(b["auc"], abs=1e-9)


def test_kept_scores_are_read_back_exactly_and_recomputed_when_they_do_not_fit(tmp_path):
    tok = tiny_tokenizer()
    from privtune.data.corpora import generate_corpus

    records = generate_corpus("customer-sim", n_individuals=4, seed=3)
    members, nonmembers = (encode_records(part, tok, max_length=128) for part in (records[:3], records[3:]))
    model = tiny_model("llama")
    computed = []

    def compute():
        computed.append(1)
        return score_tokens(model, members, CPU), score_tokens(model, nonmembers, CPU)

    cache = ScoreCache(tmp_path / "scores", {"base_run": "r", "data": "d"})
    first = cache.scores("tiny-llama", members, nonmembers, compute)
    again = cache.scores("tiny-llama", members, nonmembers, compute)
    assert len(computed) == 1
    for a, b in zip(first, again):
        for field in ("nll", "mu", "sigma", "valid", "sensitive"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
    path = cache.path("tiny-llama")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # Other records under the same key (a digest clash, a file copied by hand): recomputed.
    cache.scores("tiny-llama", nonmembers, members, lambda: (again[1], again[0]))
    assert cache.scores("tiny-llama", members, nonmembers, compute) and len(computed) == 2
    path.write_bytes(b"not a numpy file")
    cache.scores("tiny-llama", members, nonmembers, compute)
    assert len(computed) == 3
    path.write_bytes(path.read_bytes()[:200])  # a write cut short
    cache.scores("tiny-llama", members, nonmembers, compute)
    assert len(computed) == 4
    # Another model, device or batch size is another file.
    assert cache.path("other") != path
    assert ScoreCache(tmp_path / "scores", {"base_run": "r", "data": "d", "batch_size": 8}).path("tiny-llama") != path


def test_the_score_cache_key_names_the_device_model_not_only_its_type(tmp_path):
    import platform

    from privtune.study.score_cache import ScoreCache, device_name

    assert device_name(torch.device("cpu")) == f"cpu-{platform.machine()}"
    on = {name: ScoreCache(tmp_path, {"device": name}).path("m") for name in ("cuda-NVIDIA H100", "cuda-NVIDIA A10")}
    assert on["cuda-NVIDIA H100"] != on["cuda-NVIDIA A10"]  # a mixed cluster's GPUs do not share base scores
