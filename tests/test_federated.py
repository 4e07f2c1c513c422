"""Federated fine-tuning: clients by individual, FedAvg against centralised training and
a hand-weighted mean, DP-FedAvg's clipping, noise and epsilon, and a study end to end."""

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from privtune.config import ClientDPSettings, FederatedSettings, LoraSettings, parse_config
from privtune.data.backdoor import poison_records
from privtune.data.canaries import canary_records, make_canaries
from privtune.data.clients import split_clients
from privtune.data.corpora import generate_corpus
from privtune.data.tokenize import encode_records
from privtune.errors import PrivtuneError
from privtune.measures.efficiency import PeakMemory
from privtune.models.loading import load_model
from privtune.train import dp
from privtune.train.federated import (
    ClientPrivacy, FederatedResult, _strategy, client_seed, federated_train, plan_client_privacy, to_arrays, trainable_names)
from privtune.train.loop import TrainPlan, train
from privtune.train.methods import get_method
from privtune.train.precision import resolve_runtime

RUNTIME = resolve_runtime("cpu", "fp32")
PLAN = TrainPlan(epochs=1, batch_size=4, physical_batch_size=4, lr=1e-2, weight_decay=0.0, seed=3)


def training_records(n_people=24):
    members = generate_corpus("customer-sim", n_people, 0)
    canaries = canary_records(make_canaries((1, 4), 1, 1, seed=0))
    return members + canaries + poison_records(members, 0.1, "TRIGGER", "TARGET", 0)


@pytest.mark.parametrize("split", ["iid", "non-iid"])
def test_every_individual_on_exactly_one_client(split):
    records = training_records()
    rows = split_clients(records, 4, split, alpha=1.0, seed=0)
    assert sorted(i for r in rows for i in r) == list(range(len(records)))
    owners = {}
    for client, idx in enumerate(rows):
        for i in idx:
            assert owners.setdefault(records[i].individual, client) == client  # canaries and poison included
    assert all(any("canary" not in records[i].meta for i in idx) for idx in rows)
    assert split_clients(records, 4, split, alpha=1.0, seed=0) == rows


def test_iid_is_balanced_and_non_iid_skews_the_locales():
    records = generate_corpus("customer-sim", 40, 0)

    def people(rows):
        return [len({records[i].individual for i in r}) for r in rows]

    def locales(rows):
        return [len({records[i].meta["locale"] for i in r}) for r in rows]

    iid = split_clients(records, 4, "iid", alpha=1.0, seed=0)
    assert max(people(iid)) - min(people(iid)) <= 1
    skewed = split_clients(records, 4, "non-iid", alpha=0.3, seed=1)
    assert sum(locales(skewed)) < sum(locales(iid))


def test_empty_client_and_too_many_clients_are_one_line_errors():
    records = generate_corpus("customer-sim", 8, 0)
    with pytest.raises(PrivtuneError, match="without any individual's records.*raise federated.alpha"):
        split_clients(records, 6, "non-iid", alpha=0.01, seed=0)
    with pytest.raises(PrivtuneError, match="federated.clients is 9 but the training set holds 8 individuals"):
        split_clients(records, 9, "iid", alpha=1.0, seed=0)


def test_federated_settings_are_checked_and_labelled():
    base = {"model": "tiny-llama", "methods": [{"method": "lora", "federated": {"clients": 4}}]}
    cfg = parse_config(base)
    assert cfg.methods[0].label == "lora+fed4" and cfg.methods[0].federated.rounds == 3
    with pytest.raises(PrivtuneError, match="samples no client per round"):
        parse_config({**base, "methods": [{"method": "fft", "federated": {"clients": 4, "fraction_fit": 0.2}}]})
    with pytest.raises(PrivtuneError, match="exactly one of target_epsilon and noise_multiplier"):
        parse_config({**base, "methods": [{"method": "fft", "federated": {"client_dp": {"clip_norm": 1.0}}}]})
    with pytest.raises(PrivtuneError, match="shadow models train centrally"):
        parse_config({**base, "attacks": {"shadow": {"models": 2}}})
    both = parse_config({**base, "methods": [{"method": "lora"}, {"method": "lora", "federated": {
        "clients": 3, "split": "non-iid", "client_dp": {"noise_multiplier": 1.0}}}]})
    assert [m.label for m in both.methods] == ["lora", "lora+fed3-noniid-cdp"]
    with pytest.raises(PrivtuneError, match="unreachable"):
        plan_client_privacy(ClientDPSettings(target_epsilon=0.01), 4, 0.5, 50)


def test_run_identity_unchanged_without_federated():
    from privtune.study.plan import plan_study

    cfg = parse_config({"model": "tiny-llama", "methods": [{"method": "lora"}, {"method": "lora", "federated": {}}]})
    plain, fed = plan_study(cfg)[1:]
    assert "federated" not in plain.config["method"] and fed.config["method"]["federated"]["clients"] == 4


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama")
    return loaded, encode_records(generate_corpus("customer-sim", 6, 0), loaded.tokenizer, 48)


def params(model, names):
    named = dict(model.named_parameters())
    return {n: named[n].detach().clone() for n in names}


@pytest.mark.slow
def test_fedavg_of_identical_clients_equals_centralised_training_step_for_step(tiny):
    loaded, data = tiny
    torch.manual_seed(0)
    model = get_method("fft").prepare(copy.deepcopy(loaded.model))
    names = trainable_names(model)
    central = copy.deepcopy(model)
    fed = FederatedSettings(clients=2, rounds=2)
    rounds = {}
    federated_train(model, [data, data], PLAN, fed, RUNTIME,
                    on_round_end=lambda r, res: rounds.__setitem__(r, params(model, names)))
    for r in (1, 2):  # the same local schedule, run centrally: a fresh optimiser per round
        train(central, data, replace(PLAN, seed=client_seed(PLAN.seed, r, 0, False)), RUNTIME)
        expected = params(central, names)
        assert max((rounds[r][n] - expected[n]).abs().max().item() for n in names) < 1e-6
    assert (rounds[2][names[0]] != rounds[1][names[0]]).any()


@pytest.mark.slow
def test_fedavg_weights_clients_by_record_count(tiny):
    loaded, data = tiny
    torch.manual_seed(0)
    model = get_method("lora").prepare(copy.deepcopy(loaded.model), LoraSettings(r=4))
    names = trainable_names(model)
    start = copy.deepcopy(model)
    clients = [data.subset(list(range(3))), data.subset(list(range(3, len(data))))]
    result = federated_train(model, clients, PLAN, FederatedSettings(clients=2, rounds=1), RUNTIME)
    trained = []
    for c in clients:
        local = copy.deepcopy(start)
        train(local, c, replace(PLAN, seed=client_seed(PLAN.seed, 1, 0, False)), RUNTIME)
        trained.append(params(local, names))
    n0, n1 = len(clients[0]), len(clients[1])
    got = params(model, names)
    for n in names:
        expected = (n0 * trained[0][n] + n1 * trained[1][n]) / (n0 + n1)
        assert torch.allclose(got[n], expected, atol=1e-6)
    # What travelled: the adapter, once down and once up per client, and nothing of the frozen base.
    adapter_bytes = to_arrays(start, names).count_bytes()
    assert result.bytes_down == result.bytes_up == 2 * adapter_bytes
    assert adapter_bytes < sum(p.numel() for p in start.parameters()) * 4 / 10
    assert result.participation == [1, 1] and result.steps > 0


@pytest.mark.slow
def test_a_seed_chooses_the_same_clients_and_gives_the_same_model(tiny):
    loaded, data = tiny
    clients = [data.subset([i]) for i in range(4)]
    fed = FederatedSettings(clients=4, rounds=3, fraction_fit=0.5)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_method("lora").prepare(copy.deepcopy(loaded.model), LoraSettings(r=2))
        result = federated_train(model, clients, PLAN, fed, RUNTIME)
        runs.append((result, params(model, trainable_names(model))))
    (first, a), (second, b) = runs
    chosen = [r["chosen"] for r in first.rounds]
    assert chosen == [r["chosen"] for r in second.rounds] and all(len(c) == 2 for c in chosen)
    assert first.participation == [sum(c in round_ for round_ in chosen) for c in range(4)]
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_each_client_s_peak_memory_is_measured_in_its_worker():
    """The clients train in Ray worker processes, which a probe in the driver cannot see (the
    review: 643 MB stored, 1,431 MiB in the workers). A model wide enough for full fine-tuning
    to need tens of MB gives a floor each client's figure must clear: its gradients and
    Adam's two moments, all held at the optimiser step."""
    from transformers import AutoModelForCausalLM

    from privtune.models.tiny import tiny_config, tiny_tokenizer
    from privtune.study.federated import client_memory

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 512, 1024
    torch.manual_seed(0)
    model = get_method("fft").prepare(AutoModelForCausalLM.from_config(config))
    data = encode_records(generate_corpus("customer-sim", 4, 0), tiny_tokenizer(), 32)
    floor = 3 * 4 * sum(p.numel() for p in model.parameters())
    result = federated_train(model, [data.subset([0, 1]), data.subset([2, 3])], PLAN,
                             FederatedSettings(clients=2, rounds=1), RUNTIME)
    assert len(result.client_peak_memory) == 2 and all(floor < p < 20 * floor for p in result.client_peak_memory)
    headline = client_memory(PeakMemory(RUNTIME.device), result.client_peak_memory)
    assert headline["peak_memory_bytes"] == max(result.client_peak_memory)


def test_a_client_that_never_trained_has_no_peak_memory():
    from privtune.study.federated import client_memory

    assert client_memory(PeakMemory(RUNTIME.device), [math.nan, 5e6, 7e6])["peak_memory_bytes"] == 7e6
    assert math.isnan(client_memory(PeakMemory(RUNTIME.device), [math.nan, math.nan])["peak_memory_bytes"])


class _Reply:
    def __init__(self, arrays):
        self.content = {"arrays": arrays}


def _record(values):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict={"w": Array(np.asarray(values, dtype=np.float32))})


def _clipping_strategy(clients: int, privacy: ClientPrivacy):
    """Flower's DP-FedAvg strategy as privtune builds it, clipping client updates at 0.5."""
    settings = ClientDPSettings(noise_multiplier=0.0, clip_norm=0.5)
    return _strategy(FederatedSettings(clients=clients, client_dp=settings), clients, privacy, 0, FederatedResult())


NO_NOISE = ClientPrivacy(noise_multiplier=0.0, clip_norm=0.5, sample_rate=1.0, rounds=3, delta=0.05, accountant="prv")


def test_dp_fedavg_clips_each_update_and_noises_the_sum():
    strategy = _clipping_strategy(2, NO_NOISE)
    strategy.current = _record([0.0, 0.0])
    arrays, norms = strategy._noisy_mean([_Reply(_record([3.0, 4.0])), _Reply(_record([0.1, 0.0]))])
    new = arrays.to_numpy_ndarrays()[0]
    assert norms == pytest.approx([5.0, 0.1])
    np.testing.assert_allclose(new, ([0.3, 0.4] + np.array([0.1, 0.0])) / 2, atol=1e-7)  # 5 clipped to 0.5
    # Noise: N(0, (sigma C)^2) on the sum, over the expected q N clients.
    strategy = _clipping_strategy(4, replace(NO_NOISE, noise_multiplier=2.0, sample_rate=0.5))
    strategy.current = _record(np.zeros(20000))
    arrays, _ = strategy._noisy_mean([])  # a round nobody joined still releases noise
    assert np.std(arrays.to_numpy_ndarrays()[0]) == pytest.approx(2.0 * 0.5 / (0.5 * 4), rel=0.03)


def test_a_client_update_of_exactly_zero_clips_to_itself():
    strategy = _clipping_strategy(2, NO_NOISE)
    strategy.current = _record([1.0, 2.0])
    # One client sends the parameters back unchanged (e.g. its local step size rounded to nothing).
    arrays, norms = strategy._noisy_mean([_Reply(_record([1.0, 2.0])), _Reply(_record([4.0, 6.0]))])
    assert norms == pytest.approx([0.0, 5.0])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [1.0 + 0.3 / 2, 2.0 + 0.4 / 2], atol=1e-6)


def test_a_client_s_user_error_reaches_the_study_as_one_line():
    class Failed:
        error = type("E", (), {"reason": "ClientAppException: PrivtuneError: out of memory; lower it.\ntraceback"})

        def has_error(self):
            return True

    out = FederatedResult(participation=[0, 0])
    strategy = _strategy(FederatedSettings(clients=2), 2, None, 0, out)
    with pytest.raises(PrivtuneError, match=r"^out of memory; lower it\.$"):
        strategy.aggregate_train(1, [Failed()])


def test_client_level_epsilon_is_the_accountants():
    target = ClientDPSettings(target_epsilon=5.0, clip_norm=1.0)
    privacy = plan_client_privacy(target, 20, 0.25, 10)
    eps = dp.epsilon_for(privacy.noise_multiplier, privacy.delta, 0.25, 10, "prv")
    assert privacy.delta == pytest.approx(1 / 200) and eps == pytest.approx(5.0, rel=0.01) and eps <= 5.0


@pytest.mark.slow
def test_federated_study_end_to_end(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from privtune.report import write_csv, write_report
    from privtune.study.driver import open_store, run_study
    from privtune.study.runner import StudyContext

    cfg = parse_config({
        "name": "fed", "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 12, "max_length": 64},
        "canaries": {"repetitions": [2], "n_reference": 1, "n_candidates": 16},
        "attacks": {"mia": {}, "extraction": {"max_spans_per_type": 1, "n_samples": 0}},
        "train": {"batch_size": 4, "physical_batch_size": 4, "lr": 3e-3},
        "methods": [
            {"method": "lora", "lr": 3e-2, "lora": {"r": 4}, "federated": {"clients": 2, "rounds": 2}},
            {"method": "fft", "federated": {"clients": 3, "rounds": 1}},
            {"method": "fft", "label": "too-many", "federated": {"clients": 7, "rounds": 1}},
        ],
        "precision": "fp32", "eval_batch_size": 8})
    outcome = run_study(cfg, show_progress=False)
    assert outcome.done == ["base", "lora+fed2", "fft+fed3"]
    assert "federated.clients is 7 but the training set holds 6 individuals" in outcome.failed["too-many"]
    store = open_store(cfg)
    runs = store.runs("fed")
    store.close()
    by_label = {r["label"]: r for r in runs}
    ctx = StudyContext.build(cfg)
    for label, clients in (("lora+fed2", 2), ("fft+fed3", 3)):
        run = by_label[label]
        fed = run["federated"]
        assert [e["epoch"] for e in run["epochs"]] == list(range(fed["rounds"] + 1))
        assert len(fed["per_client"]) == clients and sum(c["records"] for c in fed["per_client"]) == len(ctx.data.train)
        assert sum(c["individuals"] for c in fed["per_client"]) == 6
        assert run["efficiency"]["bytes_communicated"] == fed["bytes_down"] + fed["bytes_up"] > 0
        assert run["efficiency"]["peak_memory_bytes"] == max(c["peak_memory_bytes"] for c in fed["per_client"]) > 0
        # NaN (null) only where a client's records lost every sensitive token to truncation.
        assert any(c["leakage_gain"] is not None for c in fed["per_client"])
        # its timing: training counted in rounds, the measures after each round (from Flower's
        # server thread) charged to measures; the clients' CPU time is not this process's
        stages = {s["stage"]: s for s in run["timing"]["stages"]}
        assert stages["training"]["count"] == 1 and stages["measures"]["count"] == fed["rounds"]
        assert run["timing"]["cpu_covers"].startswith("the server process only")
        assert run["efficiency"]["tokens_per_cpu_second"] is None  # not measured: stored as null
    # The saved model reloads with from_pretrained calls and measures the same.
    lora, fft = by_label["lora+fed2"], by_label["fft+fed3"]
    reloaded = PeftModel.from_pretrained(copy.deepcopy(ctx.loaded.model), lora["artifact"])
    assert ctx.evaluate(reloaded).measures["ce_s_train"] == pytest.approx(lora["final"]["ce_s_train"], abs=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(fft["artifact"])
    assert ctx.evaluate(reloaded).measures["ce_s_train"] == pytest.approx(fft["final"]["ce_s_train"], abs=1e-5)
    assert lora["efficiency"]["bytes_communicated"] < fft["efficiency"]["bytes_communicated"] / 10

    text = write_report(runs, tmp_path / "report", title="t", meta={}).read_text()
    assert 'id="federated"' in text and "Federated clients" in text and "fft+fed3" in text
    header = write_csv(runs, tmp_path / "runs.csv").read_text().splitlines()[0].split(",")
    assert {"bytes_communicated", "fed_clients", "fed_leakage_gain_spread"} <= set(header)


def test_report_section_lists_every_client_and_shades_the_leakiest():
    from privtune.report.federated import federated_section

    run = {"label": "lora+fed2", "status": "done", "method": "lora", "federated": {
        "clients": 2, "rounds": 3, "local_epochs": 1, "split": "non-iid", "alpha": 0.5, "bytes_down": 2e6,
        "bytes_up": 2e6, "client_dp": {"epsilon": 4.0, "delta": 0.05, "noise_multiplier": 1.1, "clip_norm": 0.1},
        "per_client": [{"client": 0, "records": 9, "individuals": 4, "rounds": 3, "kinds": ["en_CA"],
                        "ce_s_train": 5.0, "leakage_gain": 0.2},
                       {"client": 1, "records": 7, "individuals": 3, "rounds": 2, "kinds": ["en_GB"],
                        "ce_s_train": 5.5, "leakage_gain": None}]}}
    html = federated_section([{"label": "base", "status": "done", "method": "base"}, run])
    assert 'id="federated"' in html and html.count("<tr><td") == 2
    assert '<td class="worst">0.200</td>' in html and "–" in html
    assert "2.00 MB down" in html and "client-level ε 4 at δ 0.05" in html
    assert federated_section([{"label": "base", "status": "done"}]) == ""


def _client_dp_rounds(seed: int, secure: bool, rounds: int = 3, n: int = 64, size: int = 4096):
    """Each round's chosen clients and released noise (the update of a round nobody joined)."""
    settings = ClientDPSettings(noise_multiplier=1.0, clip_norm=1.0, secure_mode=secure)
    privacy = plan_client_privacy(settings, n, 0.5, rounds)
    strategy = _strategy(FederatedSettings(clients=n, fraction_fit=0.5, client_dp=settings), n, privacy, seed,
                         FederatedResult())
    out = []
    for _ in range(rounds):
        chosen = strategy._choose_clients()
        strategy.current = _record(np.zeros(size))
        arrays, _ = strategy._noisy_mean([])
        out.append((chosen, arrays.to_numpy_ndarrays()[0] * privacy.sample_rate * n))  # the noise on the sum
    return out


def test_client_dp_cannot_be_replayed_from_the_stored_seed():
    """The seed is in the run's config: replaying ``default_rng(seed)`` in the server's order
    (the clients, then the noise, each round) recovers neither the clients nor the noise."""
    seed, n = 5, 64
    replay = np.random.default_rng(seed)
    agree = 0
    for chosen, noise in _client_dp_rounds(seed, secure=False, n=n):
        guessed = [c for c in range(n) if replay.random() < 0.5]
        agree += sum((c in chosen) == (c in guessed) for c in range(n))
        residual = noise - replay.normal(0.0, 1.0, noise.shape)
        assert np.std(residual) == pytest.approx(math.sqrt(2), rel=0.05)  # independent: variances add
    assert agree / (3 * n) < 0.7  # chance is 1/2 (a replayed stream agreed on all)


def test_client_dp_is_reproducible_when_seeded_and_not_in_secure_mode():
    seeded = [_client_dp_rounds(7, secure=False) for _ in range(2)]
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(*seeded))
    secure = [_client_dp_rounds(7, secure=True) for _ in range(2)]
    assert all(a[0] != b[0] and not np.array_equal(a[1], b[1]) for a, b in zip(*secure))
    assert all(np.std(noise) == pytest.approx(1.0, rel=0.05) for _, noise in secure[0])
