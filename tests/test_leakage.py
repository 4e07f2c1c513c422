"""Leakage and utility against numbers worked out by hand, and the token cache against
a direct per-token computation."""

import math

import numpy as np
import pytest
import torch

from privtune.data.records import Record, Span
from privtune.data.tokenize import encode_records
from privtune.measures.leakage import leakage_measures, mean_loss
from privtune.measures.token_scores import TokenScores, score_tokens
from privtune.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from privtune.train.precision import Runtime


def scores(nll, sensitive, valid=None):
    nll = np.array(nll, dtype=np.float64)
    valid = np.ones_like(nll, bool) if valid is None else np.array(valid, bool)
    zeros = np.zeros_like(nll)
    return TokenScores(nll=nll, mu=zeros, sigma=zeros, valid=valid, sensitive=np.array(sensitive, bool) & valid)


# Three records, four target tokens each; the last token of record 3 is padding.
SENS = [[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1]]
VALID = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
MODEL_TRAIN = scores([[1.0, 0.5, 0.3, 2.0], [0.2, 1.0, 3.0, 1.0], [2.0, 2.0, 0.4, 9.0]], SENS, VALID)
MODEL_TEST = scores([[1.0, 2.0, 2.5, 1.5], [3.0, 1.0, 1.0, 2.0], [1.0, 1.0, 2.0, 1.0]], SENS, VALID)
BASE_TRAIN = scores([[2.0, 3.0, 3.0, 2.0], [2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 3.0, 1.0]], SENS, VALID)
BASE_TEST = scores([[2.0, 3.5, 3.0, 2.0], [3.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.5, 1.0]], SENS, VALID)


def test_three_record_toy_case_by_hand():
    m = leakage_measures(MODEL_TRAIN, MODEL_TEST, BASE_TRAIN, BASE_TEST)
    # Sensitive valid train tokens: 0.5, 0.3 | 0.2 | 0.4  (9.0 is padding) -> mean 1.4 / 4
    assert m["ce_s_train"] == pytest.approx(0.35)
    # Sensitive test tokens: 2.0, 2.5 | 3.0 | 2.0 -> 9.5 / 4
    assert m["ce_s_test"] == pytest.approx(2.375)
    # Non-sensitive train: 1.0, 2.0 | 1.0, 3.0, 1.0 | 2.0, 2.0 -> 12 / 7
    assert m["ce_n_train"] == pytest.approx(12 / 7)
    # Non-sensitive test: 1.0, 1.5 | 1.0, 1.0, 2.0 | 1.0, 1.0 -> 8.5 / 7
    assert m["ce_n_test"] == pytest.approx(8.5 / 7)
    # Base sensitive train: 3, 3 | 2 | 3 -> 2.75; base sensitive test: 3.5, 3 | 3 | 2.5 -> 3.0
    assert m["leakage_gain"] == pytest.approx(2.75 - 0.35)
    assert m["memorisation_gap"] == pytest.approx(2.375 - 0.35)
    assert m["memorisation_gap_net"] == pytest.approx((2.375 - 0.35) - (3.0 - 2.75))
    # Base non-sensitive test: 2, 2 | 2, 2, 2 | 2, 2 -> 2.0
    assert m["utility_gain"] == pytest.approx(2.0 - 8.5 / 7)
    assert m["utility_ppl"] == pytest.approx(math.exp(8.5 / 7))
    # Per-record sensitive means on train: 0.4, 0.2, 0.4 -> median 0.4, p10 0.24, p90 0.4
    assert m["ce_s_train_record_p50"] == pytest.approx(0.4)
    assert m["ce_s_train_record_p10"] == pytest.approx(0.24)
    assert m["ce_s_train_record_p90"] == pytest.approx(0.4)


def test_no_sensitive_tokens_gives_nan_not_a_crash():
    s = scores([[1.0, 2.0]], [[0, 0]])
    assert math.isnan(mean_loss(s, sensitive=True))
    assert mean_loss(s, sensitive=False) == pytest.approx(1.5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_token_scores_match_direct_computation(family):
    tok = tiny_tokenizer()
    recs = [Record("a", "a", "Call Jane Doe on 555-0100 today.", [Span(5, 13, "NAME"), Span(17, 25, "PHONE")]),
            Record("b", "b", "Hi.", [Span(0, 2, "NAME")])]
    data = encode_records(recs, tok, max_length=64)
    model = tiny_model(family).eval()
    got = score_tokens(model, data, Runtime(torch.device("cpu"), "fp32"), batch_size=2)
    for row, rec in enumerate(recs):
        ids = tok(rec.text)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(1, len(ids)):
            assert got.nll[row, t - 1] == pytest.approx(-logp[t - 1, ids[t]].item(), abs=1e-4)
            p = logp[t - 1].exp()
            mu = (p * logp[t - 1]).sum()
            assert got.mu[row, t - 1] == pytest.approx(mu.item(), abs=1e-4)
            # centred variance: float32 within 1e-6 of float64 (E[x^2] - mu^2 was off by up to 6e-5)
            assert got.sigma[row, t - 1] == pytest.approx(((p * logp[t - 1] ** 2).sum() - mu**2).sqrt().item(), abs=1e-6)
        assert not got.valid[row, len(ids) - 1:].any()
