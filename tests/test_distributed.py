"""Data-parallel training (train/distributed.py): two gloo processes on the CPU give what
one process gives, for plain and DP-SGD training, with clipping that binds and with
noise (added once, not once per rank)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from privtune.config import DPSettings, LoraSettings
from privtune.models.tiny import tiny_model
from privtune.study.driver import open_store, run_study
from privtune.train import distributed
from privtune.train.loop import TrainPlan, train
from privtune.train.losses import per_record_loss
from privtune.train.methods import get_method
from privtune.train.precision import Runtime
from test_faults import fast_study
from test_loop import toy_data

CPU = Runtime(torch.device("cpu"), "fp32")
SMALL_C = 1e-3  # far below every record's gradient norm on the tiny model: clipping binds

CASES = {
    "fft": ("fft", None),
    "dp-fft-clipped": ("dp-fft", DPSettings(noise_multiplier=0.0, max_grad_norm=SMALL_C, accountant="rdp")),
    "dp-lora-opacus-clipped": ("dp-lora", DPSettings(noise_multiplier=0.0, max_grad_norm=SMALL_C, accountant="rdp",
                                                     engine="opacus")),
    "dp-fft-noisy": ("dp-fft", DPSettings(noise_multiplier=1.0, max_grad_norm=SMALL_C, accountant="rdp")),
}
SECURE = ("dp-fft", DPSettings(noise_multiplier=1.0, max_grad_norm=SMALL_C, accountant="rdp", secure_mode=True))


def run_case(method: str, settings: DPSettings | None) -> dict:
    """Train a tiny Llama; return the gradient of each optimizer step and the final trainable parameters."""
    torch.manual_seed(0)
    model = get_method(method).prepare(tiny_model("llama"), LoraSettings(r=2))
    names = {id(p): n for n, p in model.named_parameters()}
    steps: list[dict] = []

    def keep_gradients(optimizer, args, kwargs):
        steps.append({names[id(p)]: p.grad.clone() for group in optimizer.param_groups for p in group["params"]
                      if p.grad is not None})

    hook = register_optimizer_step_pre_hook(keep_gradients)
    try:
        # 12 records, batches of 6 in chunks of 2: the ranks take 3 records each, in 2 chunks.
        train(model, toy_data(12), TrainPlan(epochs=2, batch_size=6, physical_batch_size=2, lr=1e-2,
                                             weight_decay=0.01, seed=0, dp=settings), CPU)
    finally:
        hook.remove()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"steps": steps, "params": trained}


def _worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank, world_size, rank, "cpu", init_method=init_method)
    try:
        results = {name: run_case(*case) for name, case in CASES.items()}
        results["secure"] = run_case(*SECURE)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, f"file://{out / 'rendezvous'}", str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    return {name: run_case(*case) for name, case in CASES.items()}


def test_clipping_binds_on_the_tiny_model():
    model = tiny_model("llama")
    data = toy_data(12)
    for i in range(3):
        model.zero_grad()
        logits = model(input_ids=data.input_ids[i:i + 1], attention_mask=data.attention_mask[i:i + 1]).logits
        per_record_loss(logits, data.labels[i:i + 1]).sum().backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
        assert norm > 100 * SMALL_C


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_processes_train_like_one(case, two_ranks, one_process):
    expected = one_process[case]
    first, second = (rank[case] for rank in two_ranks)
    for name in expected["params"]:
        assert torch.equal(first["params"][name], second["params"][name]), f"{case}: ranks drifted apart on {name}"
    assert len(first["steps"]) == len(expected["steps"])
    for step, (got, want) in enumerate(zip(first["steps"], expected["steps"])):
        assert got.keys() == want.keys()
        for name, grad in want.items():
            if step == 0:  # the same sum in another order (noise included, once)
                torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=f"{case} grad {name}")
            else:
                # Same records, but at parameters float noise apart: Adam divides by sqrt(v), so noise on a
                # 1e-9 gradient becomes a visible step. Another batch would be off by its whole size.
                torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-3 * grad.abs().max().item(),
                                           msg=f"{case} step {step} grad {name}")


@pytest.mark.slow
def test_noise_is_added_once_not_per_rank(two_ranks, one_process):
    noisy, clean = two_ranks[0]["dp-fft-noisy"]["steps"][0], one_process["dp-fft-clipped"]["steps"][0]
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    # grad = (clipped sum + N(0, sigma^2 C^2)) / (q N) with sigma = 1, q N = 6: one draw, not two summed.
    assert noise.std().item() == pytest.approx(SMALL_C / 6, rel=0.05)


@pytest.mark.slow
def test_secure_noise_is_drawn_on_rank_zero_and_shared(two_ranks):
    a, b = (rank["secure"] for rank in two_ranks)
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name


@pytest.mark.slow
def test_privtune_run_under_torchrun_writes_one_row_per_run_from_rank_zero(tmp_path):
    methods = [{"method": "fft"}, {"method": "dp-lora", "lora": {"r": 2},
                                   "dp": {"noise_multiplier": 0.5, "max_grad_norm": 0.01, "accountant": "rdp"}}]
    one = fast_study(tmp_path / "one", methods=methods)
    two = fast_study(tmp_path / "two", methods=methods)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(two.model_dump(mode="json")))
    done = _privtune_run_on_two_ranks(study)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("data-parallel over 2 processes") == 1  # rank 0 alone prints
    assert run_study(one, show_progress=False).failed == {}
    rows = {cfg.name: _rows(cfg) for cfg in (one, two)}
    assert sorted(rows[two.name]) == ["base", "dp-lora", "fft"]
    for label, row in rows[two.name].items():
        assert row["status"] == "done"
        if label != "base":
            assert row["efficiency"]["world_size"] == 2
            assert row["efficiency"]["tokens"] == rows[one.name][label]["efficiency"]["tokens"]
        assert row["final"] == pytest.approx(rows[one.name][label]["final"], rel=1e-3, abs=1e-5), label
    # Rerun with a bad run added: rank 0 skips the finished ones (the others follow it), records
    # the failure, and the job stops there; the three rows are untouched.
    bad = {"method": "dp-lora", "label": "bad-delta", "dp": {"target_epsilon": 4.0, "delta": 0.5}}
    study.write_text(yaml.safe_dump(fast_study(tmp_path / "two", methods=[*methods, bad]).model_dump(mode="json")))
    again = _privtune_run_on_two_ranks(study)
    assert again.returncode != 0 and "run bad-delta failed in a data-parallel study" in again.stderr
    after = _rows(two)
    assert after["bad-delta"]["status"] == "failed" and "delta" in after["bad-delta"]["error"]
    assert {label: row["final"] for label, row in after.items() if label != "bad-delta"} == \
        {label: row["final"] for label, row in rows[two.name].items()}


def _privtune_run_on_two_ranks(study: Path) -> subprocess.CompletedProcess:
    """``privtune run STUDY`` under ``torchrun`` with 2 gloo processes of one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "privtune", "run", str(study), "--no-report"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _rows(cfg) -> dict:
    store = open_store(cfg)
    try:
        return {r["label"]: r for r in store.runs(cfg.name)}
    finally:
        store.close()


@pytest.mark.slow
def test_a_study_with_unlearning_runs_both_phases_under_torchrun(tmp_path):
    """Unlearning runs come in a second phase, trained by rank 0 alone: the other ranks must
    still be there for the first and be released only after the second."""
    methods = [{"method": "fft"},
               {"method": "unlearn-ga", "epochs": 1, "unlearn": {"source": "fft", "forget": {"fraction": 0.25}}}]
    cfg = fast_study(tmp_path, methods=methods, save_artifacts=True)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    done = _privtune_run_on_two_ranks(study)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = _rows(cfg)
    assert {label: row["status"] for label, row in rows.items()} == {
        "base": "done", "fft": "done", "fft+retrain": "done", "fft+unlearn-ga": "done"}
    assert rows["fft+retrain"]["efficiency"]["world_size"] == 2  # data-parallel, like its source
    assert "world_size" not in rows["fft+unlearn-ga"]["efficiency"]  # rank 0 alone
