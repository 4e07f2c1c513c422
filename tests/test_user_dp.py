"""User-level DP-SGD (``dp.unit: individual``), checked against slow obvious references.

The reference for a person's gradient is the sum of their records' gradients, each from
its own ordinary backward pass on a plain copy of the model (``reference_grads`` of
``tests/test_dp_engine.py``), summed in float64. The sensitivity test is the property
the accountant assumes: removing one person's records moves the clipped sum by at
most C; record-level clipping (what privtune did before ``dp.unit``) does not keep it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dp_engine import case, flat_norm, make_batch, make_model, rel_err
from test_ghost_engine import _random_forms

from privtune.config import DPSettings
from privtune.data.records import Record
from privtune.data.tokenize import EncodedDataset
from privtune.errors import PrivtuneError
from privtune.train import dp
from privtune.train.dp import GhostClipper, OpacusClipper, PrivacyUnits
from privtune.train.dp.grad_forms import GramCache, inner, total_sq_norms, total_weighted_sum
from privtune.train.dp.grouping import Grouping
from privtune.train.loop import TrainPlan, plan_privacy, train
from privtune.train.losses import per_record_loss
from privtune.train.precision import Runtime

CPU = Runtime(torch.device("cpu"), "fp32")
#: record -> person of the 6-record batches of ``case``: persons of 3, 2 and 1 records.
GROUPS = torch.tensor([0, 1, 0, 2, 1, 0])
ENGINES = {"privtune-ghost": lambda: GhostClipper("ghost"), "privtune-per-sample": lambda: GhostClipper("per-sample"),
           "privtune-auto": GhostClipper, "opacus": OpacusClipper}


def grouped_reference(ref, groups):
    """Per person: the sum of their records' reference gradients (float64)."""
    n_params = len(ref[0])
    return [[sum(ref[i][k].double() for i in range(len(ref)) if groups[i] == u) for k in range(n_params)]
            for u in sorted(set(groups.tolist()))]


def clipped(grads, c):
    """(norms, sum_u min(1, C/||G_u||) G_u) of per-unit gradients."""
    norms = torch.stack([flat_norm(g) for g in grads])
    factors = (c / norms).clamp(max=1.0)
    return norms, [sum(float(f) * g[k] for f, g in zip(factors, grads)) for k in range(len(grads[0]))]


def engine_sum(clipper, model, batch, c, groups=None, rows=None):
    """(norms, clipped sum) of one chunk from ``clipper``, noise off."""
    ids, attn, labels = batch
    rows = slice(None) if rows is None else rows
    module = clipper.attach(model)
    try:
        loss = per_record_loss(module(input_ids=ids[rows], attention_mask=attn[rows]).logits, labels[rows])
        norms = clipper.accumulate_clipped(loss, c, groups=groups)
        clipper.finish_step(0.0, c, 1.0, torch.Generator())
        return norms, [p.grad.clone() for p in clipper.params]
    finally:
        clipper.detach()
        model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- grouping of the forms
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 5), length=st.integers(1, 4),
       d_in=st.integers(1, 4), d_out=st.integers(1, 5), data=st.data())
def test_grouped_forms_are_the_forms_of_the_summed_gradients(seed, batch, length, d_in, d_out, data):
    """Norms, cross terms (tied uses) and weighted sums of regrouped forms are those of the
    materialised per-record gradients summed per group."""
    groups = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch)))
    grouping = Grouping(groups)
    forms = _random_forms(seed, batch, length, d_in, d_out)
    grouped = [f.grouped(grouping) for f in forms]
    index = torch.unique(groups, return_inverse=True)[1]

    def summed(f):
        return torch.zeros(grouping.size, d_out, d_in, dtype=torch.float64).index_add_(0, index, f.materialize().double())

    for f, g in zip(forms, grouped):
        assert g.batch == grouping.size
        torch.testing.assert_close(g.materialize().double(), summed(f), rtol=1e-5, atol=1e-5)
    for x, gx in zip(forms, grouped):
        for y, gy in zip(forms, grouped):
            want = (summed(x) * summed(y)).flatten(1).sum(1)
            torch.testing.assert_close(inner(gx, gy).double(), want, rtol=1e-5, atol=1e-4)
    total = sum(summed(f) for f in forms)
    factors = torch.rand(grouping.size, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(total_sq_norms(grouped, GramCache.for_forms(grouped)).double(),
                               total.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(total_weighted_sum(grouped, factors).double(),
                               torch.einsum("u,u...->...", factors.double(), total), rtol=1e-5, atol=1e-4)


def test_grouping_keeps_a_shared_input_shared():
    """q, k and v share their input: regrouped once, so its Gram matrix is still formed once."""
    x = torch.randn(3, 4, 2)
    grouping = Grouping(torch.tensor([7, 2, 7]))
    assert grouping.size == 2 and grouping.width == 2 and grouping.index.tolist() == [1, 0, 1]
    assert grouping.slot.tolist() == [0, 0, 1]
    assert grouping.concat_tokens(x) is grouping.concat_tokens(x.view(3, 4, 2))
    laid = grouping.concat_tokens(x)
    assert laid.shape == (2, 8, 2)
    assert torch.equal(laid[1], torch.cat([x[0], x[2]])) and torch.equal(laid[0], torch.cat([x[1], torch.zeros(4, 2)]))


# ---------------------------------------------------------------------------- engines on tiny models
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family,mode", [("llama", "fft"), ("llama", "lora"), ("gemma", "fft"), ("gpt-neox", "fft")])
def test_per_person_norms_and_clipped_sum_match_per_example_backward(family, mode, engine):
    """llama and gemma tie the input embedding to the head: the cross terms of its two
    uses now run over all of a person's records."""
    model, batch, ref = case(family, mode)
    people = grouped_reference(ref, GROUPS)
    want_norms = torch.stack([flat_norm(g) for g in people])
    # The three-record person clipped (so record- and person-level clipping must differ);
    # the median's person was the largest one on some models, and clipped alike at both levels.
    c = 0.9 * float(want_norms[0])
    _, want = clipped(people, c)
    norms, got = engine_sum(ENGINES[engine](), model, batch, c, groups=GROUPS)
    assert norms.shape == (3,)
    assert torch.allclose(norms.double(), want_norms, rtol=1e-5, atol=0), (norms, want_norms)
    assert rel_err(got, want) <= 1e-5
    _, per_record = clipped([[g.double() for g in r] for r in ref], c)
    assert rel_err(per_record, want) > 1e-2  # record-level clipping differs: the check has teeth


@pytest.mark.parametrize("engine", ["privtune-auto", "opacus"])
def test_one_record_per_person_is_record_level_clipping(engine):
    model, batch, ref = case("llama", "lora")
    c = float(torch.stack([flat_norm(g) for g in ref]).median())
    norms_r, got_r = engine_sum(ENGINES[engine](), model, batch, c)
    norms_p, got_p = engine_sum(ENGINES[engine](), model, batch, c, groups=torch.tensor([5, 4, 3, 2, 1, 0]))
    assert torch.allclose(norms_p, norms_r.flip(0), rtol=1e-6)  # groups come in sorted-id order
    assert rel_err(got_p, got_r) <= 1e-6


@pytest.mark.parametrize("engine", ["privtune-ghost", "opacus"])
def test_removing_a_person_moves_the_clipped_sum_by_at_most_c(engine):
    """The sensitivity DP's accountant assumes, with one person owning three (identical)
    records: per person it is C; clipping records, as privtune did before, lets the
    person move the sum by 3C."""
    model = make_model("llama", "fft")
    ids, attn, labels = make_batch(6, seed=21)
    ids[1:3], attn[1:3], labels[1:3] = ids[0], attn[0], labels[0]  # person 0: records 0, 1, 2
    batch = (ids, attn, labels)
    groups = torch.tensor([0, 0, 0, 1, 2, 3])
    without = torch.arange(3, 6)
    c = 1e-3  # far below every gradient norm: everyone is clipped
    for unit_groups, bound in ((groups, c), (None, 3 * c)):
        rest = unit_groups[without] if unit_groups is not None else None
        norms, full = engine_sum(ENGINES[engine](), model, batch, c, groups=unit_groups)
        assert (norms > 10 * c).all()
        _, reduced = engine_sum(ENGINES[engine](), model, batch, c, groups=rest, rows=without)
        moved = float(flat_norm([a - b for a, b in zip(full, reduced)]))
        assert moved == pytest.approx(bound, rel=1e-4)
        assert (moved <= c * (1 + 1e-5)) == (unit_groups is not None)


def test_groups_must_match_the_batch():
    model, batch, _ = case("llama", "lora")
    with pytest.raises(ValueError, match="one id per record"):
        engine_sum(GhostClipper(), model, batch, 1.0, groups=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------- units, chunks, accounting
def test_auto_unit_is_the_individual_when_anyone_has_several_records():
    assert dp.resolve_unit("auto", ["a", "b", "a"]) == "individual"
    assert dp.resolve_unit("auto", ["a", "b", "c"]) == "record"
    assert dp.resolve_unit("record", None) == "record"
    with pytest.raises(PrivtuneError, match="auto needs"):
        dp.resolve_unit("auto", None)


def test_chunks_hold_whole_people():
    units = PrivacyUnits.of("individual", 9, ["a", "b", "a", "c", "b", "a", "d", "e", "e"])
    assert units.count == 5
    chunks = list(units.chunks(torch.tensor([0, 1, 2, 3, 4]), 3))
    rows = [r.tolist() for r, _ in chunks]
    assert rows == [[0, 2, 5], [1, 4, 3], [6, 7, 8]]  # b then c fit together; d and e too
    assert all(torch.equal(g, units.owner[r]) for r, g in chunks)
    big = list(units.chunks(torch.tensor([0, 3]), 2))  # a (3 records) above the physical size: alone
    assert [r.tolist() for r, _ in big] == [[0, 2, 5], [6]]
    records = PrivacyUnits.of("record", 5)
    assert [(r.tolist(), g) for r, g in records.chunks(torch.tensor([0, 3, 4]), 2)] == [([0, 3], None), ([4], None)]


def people_data(persons: list[int], seed: int = 9) -> EncodedDataset:
    ids, attn, _ = make_batch(len(persons), seed=seed)
    records = [Record(f"r{i}", f"p{p}", "", []) for i, p in enumerate(persons)]
    return EncodedDataset(records, ids, attn, torch.zeros_like(ids, dtype=torch.bool))


def test_accounting_is_per_person():
    data = people_data([0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5])  # 12 records, 6 people
    setup = plan_privacy(DPSettings(noise_multiplier=1.0, accountant="rdp"),
                         PrivacyUnits.of("auto", 12, [r.individual for r in data.records]), 4, 2)
    # q = 4 / 12 for each person (2 people = 4 records per step in expectation), 3 steps an epoch
    assert (setup.unit, setup.n_units, setup.sample_rate, setup.steps) == ("individual", 6, 4 / 12, 6)
    assert setup.delta == pytest.approx(1 / 60)
    with pytest.raises(PrivtuneError, match=r"holds 0\.5 people.*raise train.batch_size to 2"):
        plan_privacy(DPSettings(noise_multiplier=1.0), PrivacyUnits.of("individual", 12, [r.individual for r in
                                                                                          data.records]), 1, 1)
    with pytest.raises(PrivtuneError, match=r"N = 6 training people"):
        plan_privacy(DPSettings(noise_multiplier=1.0, delta=0.5),
                     PrivacyUnits.of("individual", 12, [r.individual for r in data.records]), 4, 1)


class _Spy(GhostClipper):
    """Records the groups of every chunk the loop hands the engine."""

    seen: list[tuple[int, torch.Tensor | None]] = []

    def accumulate_clipped(self, per_sample_loss, max_grad_norm, groups=None):
        _Spy.seen.append((per_sample_loss.shape[0], groups))
        return super().accumulate_clipped(per_sample_loss, max_grad_norm, groups)


def test_the_loop_samples_and_clips_people(monkeypatch):
    persons = [0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5]
    data = people_data(persons)
    monkeypatch.setitem(dp.DP_ENGINES._items, "privtune", _Spy)  # the registry is read-only by design
    _Spy.seen = []
    plan = TrainPlan(epochs=2, batch_size=6, physical_batch_size=2, lr=1e-2, weight_decay=0.0, seed=0,
                     dp=DPSettings(noise_multiplier=1.0, accountant="rdp"))
    result = train(make_model("llama", "lora", lora_init=True), data, plan, CPU)
    assert (result.privacy.unit, result.privacy.n_units, result.steps) == ("individual", 6, 4)
    assert result.privacy.epsilon == pytest.approx(dp.epsilon_for(1.0, 1 / 60, 0.5, 4, accountant="rdp"))
    assert result.privacy.as_dict()["unit"] == "individual"
    assert _Spy.seen and all(groups is not None and len(groups) == size for size, groups in _Spy.seen)
    counts = torch.bincount(torch.tensor(persons))
    for _, groups in _Spy.seen:  # every sampled person comes with all their records, in one chunk
        ids, n = torch.unique(groups, return_counts=True)
        assert torch.equal(n, counts[ids])
    # one record each: record-level, as before
    _Spy.seen = []
    result = train(make_model("llama", "lora", lora_init=True), people_data(list(range(12))), plan, CPU)
    assert result.privacy.unit == "record" and all(groups is None for _, groups in _Spy.seen)
    assert math.isfinite(result.privacy.epsilon)


# ---------------------------------------------------------------------------- the unit beside every ε
def test_the_unit_is_shown_beside_epsilon():
    from privtune.report.export import csv_columns, csv_row
    from privtune.report.html import fmt_epsilon

    person = {"dp": {"epsilon": 7.99, "unit": "individual", "delta": 1e-3}}
    assert fmt_epsilon(person) == "7.99 per person"
    assert fmt_epsilon({"dp": {"epsilon": 2.5, "unit": "client"}}) == "2.5 per client"
    assert fmt_epsilon({"dp": {"epsilon": 3.0, "unit": "individual, largest over clients"}}) == \
        "3 per person, largest over clients"
    assert fmt_epsilon({"dp": {"epsilon": 8.0}}) == "8 per record"  # stored before dp.unit: records were clipped
    assert fmt_epsilon({"dp": {"epsilon": math.inf, "unit": "record"}}) == "∞ per record"
    assert fmt_epsilon({"dp": None}) == "–"
    columns = csv_columns([person])
    assert columns[columns.index("dp_epsilon") + 1] == "dp_unit"
    assert csv_row(person, columns)["dp_unit"] == "individual"


def test_the_unit_is_part_of_a_runs_identity():
    """A run per record and a run per person are different runs (and runs stored before
    ``dp.unit`` drew sampling and noise from one stream: none of them may be reused)."""
    from privtune.config import parse_config
    from privtune.study.plan import plan_study

    def spec(unit):
        cfg = parse_config({"methods": [{"method": "dp-lora", "dp": {"target_epsilon": 8, "unit": unit}}]})
        return plan_study(cfg)[1]

    assert {u: spec(u).config["method"]["dp"]["unit"] for u in ("record", "auto", "individual")} == {
        "record": "record", "auto": "auto", "individual": "individual"}
    assert len({spec(u).run_id for u in ("record", "auto", "individual")}) == 3
