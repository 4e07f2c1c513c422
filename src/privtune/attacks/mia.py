"""Score-based membership inference, all from one cached forward pass per model.

Each attack maps a record's cached per-token quantities (``TokenScores``) to one score,
higher meaning "more likely a member". They are registered by name, so a study config
can pick them and a new one is one decorated function:

- ``loss`` (Yeom et al., 2018): −mean NLL.
- ``zlib`` (Carlini et al., 2021, "Extracting training data from large language models",
  §5.1; as in MIMIR's ``zlib.py``): −(mean token NLL, i.e. log-perplexity) / zlib entropy,
  the byte length of ``zlib.compress(text.encode("utf-8"))`` of the text that was scored
  (see below); texts that are merely easy (repetitive, formulaic) compress well and are
  discounted.
- ``min_k`` (Shi et al., 2024, "Detecting pretraining data", Min-K% Prob): mean
  log-probability of the k% least likely tokens: ``floor(k·n)`` of a record's n scored
  tokens (at least one), as the paper's code takes ``int(n·k)``.
- ``min_k_pp`` (Zhang et al., 2024, Min-K%++): the same over ``(log p − μ) / σ``, where μ
  and σ are the mean and spread of log p over the vocabulary at that position, over the
  same ``floor(k·n)`` tokens (Zhang et al.'s code, likewise ``int(n·k)``).
- ``reference`` (Carlini et al., 2021): −(mean NLL under the target − mean NLL under a
  reference model), with the base model θ0 as the default reference.
- ``dc_pdd`` (Zhang et al., 2024, "Pretraining Data Detection for Large Language Models:
  A Divergence-based Calibration Method"; as in their code and MIMIR's ``dc_pdd.py``):
  per scored token ``min(p · log(1/f), a)``, p its probability under the model and f its
  Laplace-smoothed frequency in a reference corpus (the study's non-member records, each
  record's own tokens left out: :mod:`privtune.attacks.token_frequency`), averaged over
  the first occurrence of each token id among the scored tokens; a = 0.01 by default, the
  paper's. Their code and MIMIR negate it and flip the ROC; here higher is member
  directly. The first token of a record, which only conditions the others, is not
  scored (MIMIR prepends an end-of-text token to score it).

The attacks that need the model itself, not only its token scores (``recall``,
``gradnorm``), are in :mod:`privtune.attacks.model_attacks`; :func:`score_attacks` takes
their per-record scores and gives them the same metrics.

Every attack runs at two levels: the whole record, and its sensitive tokens only (the
zlib text is then the record's sensitive values, joined by spaces). Records are scored
as trained, truncated to ``data.max_length`` tokens, so the records given to
:func:`score_attacks` are the trained windows
(:func:`privtune.data.tokenize.trained_windows`): zlib compresses the text the model read
up to its last scored token (the first token, which only conditions the others,
included, as in MIMIR), or the parts of the values inside that window. A record with no
scored token gets NaN and is left out of that attack's metrics.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from privtune.attacks.metrics import roc_metrics, selection_half
from privtune.attacks.model_attacks import MODEL_ATTACKS, LevelScores
from privtune.attacks.token_frequency import TokenFrequencies, first_occurrences
from privtune.data.records import Record
from privtune.errors import PrivtuneError
from privtune.measures.token_scores import TokenScores, level_positions, masked_mean
from privtune.registry import Registry


@dataclass
class AttackInputs:
    """What a score-based attack sees for one set of records."""

    target: TokenScores
    positions: np.ndarray  # (N, L-1) bool: the tokens to score
    zlib_bytes: np.ndarray  # (N,) zlib-compressed byte length of the scored text
    reference: TokenScores | None = None
    k: float = 0.2
    frequencies: TokenFrequencies | None = None  # the reference corpus's, for dc_pdd
    dc_pdd_a: float = 0.01


Attack = Callable[[AttackInputs], np.ndarray]
ATTACKS: Registry[Attack] = Registry("attack")
register_attack = ATTACKS.register
get_attack = ATTACKS.lookup


def _mean_of_lowest(values: np.ndarray, positions: np.ndarray, k: float) -> np.ndarray:
    """Per record, the mean of the ``floor(k · n)`` (at least 1) lowest values among its positions."""
    filled = np.where(positions, values, np.inf)
    ordered = np.sort(filled, axis=1)  # scored positions first, lowest first
    counts = positions.sum(axis=1)
    take = np.maximum(1, np.floor(k * counts)).astype(int)
    keep = np.arange(ordered.shape[1])[None, :] < take[:, None]
    out = masked_mean(np.where(keep, ordered, 0.0), keep)
    return np.where(counts > 0, out, np.nan)


@register_attack("loss")
def loss_attack(x: AttackInputs) -> np.ndarray:
    return -masked_mean(x.target.nll, x.positions)


@register_attack("zlib")
def zlib_attack(x: AttackInputs) -> np.ndarray:
    return -masked_mean(x.target.nll, x.positions) / np.maximum(x.zlib_bytes, 1)


@register_attack("min_k")
def min_k_attack(x: AttackInputs) -> np.ndarray:
    return _mean_of_lowest(-x.target.nll, x.positions, x.k)


@register_attack("min_k_pp")
def min_k_pp_attack(x: AttackInputs) -> np.ndarray:
    t = x.target
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (-t.nll - t.mu) / np.maximum(t.sigma, 1e-6)
    return _mean_of_lowest(z, x.positions, x.k)


@register_attack("reference")
def reference_attack(x: AttackInputs) -> np.ndarray:
    return -(masked_mean(x.target.nll, x.positions) - masked_mean(x.reference.nll, x.positions))


@register_attack("dc_pdd")
def dc_pdd_attack(x: AttackInputs) -> np.ndarray:
    first = first_occurrences(x.frequencies.ids, x.positions)
    calibrated = np.minimum(np.exp(-x.target.nll) * -x.frequencies.log_frequency, x.dc_pdd_a)
    return masked_mean(calibrated, first)


def attack_names() -> list[str]:
    """Every attack a config may name: the score-based ones, then the model attacks."""
    return list(ATTACKS) + list(MODEL_ATTACKS)


def zlib_lengths(records: list[Record], level: str) -> np.ndarray:
    """zlib-compressed byte length of each record's text, or of its sensitive values.

    ``records`` must be the trained windows, so that the text is the scored text."""
    def text(r: Record) -> str:
        return r.text if level == "record" else " ".join(value for _, value in r.span_values())
    return np.array([len(zlib.compress(text(r).encode("utf-8"))) for r in records], dtype=float)


def score_attacks(target: TokenScores, target_nonmembers: TokenScores, reference_members: TokenScores | None,
                  reference_nonmembers: TokenScores | None, member_records: list[Record],
                  nonmember_records: list[Record], *, levels=("record", "sensitive"), attacks=None,
                  k: float = 0.2, fprs=(0.01, 0.001), base: tuple[TokenScores, TokenScores] | None = None,
                  seed: int = 0, frequencies: tuple[TokenFrequencies, TokenFrequencies] | None = None,
                  dc_pdd_a: float = 0.01, model_scores: dict[str, list[LevelScores]] | None = None) -> list[dict]:
    """Every requested attack at every level: entries of the ``attacks.mia`` schema.

    ``target``/``target_nonmembers`` are the attacked model's scores on members and
    non-members; the reference scores (same records) enable the ``reference`` attack,
    the reference corpus's ``frequencies`` on (members, non-members) the ``dc_pdd``
    attack. ``member_records``/``nonmember_records`` are the records as scored, i.e. cut
    to the trained window (:func:`privtune.data.tokenize.trained_windows`): zlib reads their text.
    ``base``: the base model's scores on the same (members, non-members); each attack
    is then run on it too, for the advantage over the blind baseline, and the records
    are split by individual (``seed``) into the halves the strongest attack is chosen
    and reported on (see :mod:`privtune.attacks.metrics`).
    ``model_scores``: per model attack (:mod:`privtune.attacks.model_attacks`) requested
    in ``attacks``, its scores on the target model, then (with ``base``) on the base model.
    ``attacks=None`` runs every score-based attack whose inputs are given, and no model attack.
    """
    if not member_records or not nonmember_records:
        raise PrivtuneError("membership inference needs members and non-members",
                            "use a dataset with at least one record on each side of the split")
    if not 0 < k <= 1:
        raise PrivtuneError(f"Min-K% fraction k={k} is outside (0, 1]", "use e.g. k=0.2")
    names = list(attacks) if attacks is not None else list(ATTACKS)
    has_reference = reference_members is not None and reference_nonmembers is not None
    if attacks is None:
        names = [n for n in names if (n != "reference" or has_reference) and (n != "dc_pdd" or frequencies)]
    model_scores = model_scores or {}
    is_member = np.r_[np.ones(len(member_records), bool), np.zeros(len(nonmember_records), bool)]
    select = selection_half([r.individual for r in member_records + nonmember_records], seed)
    models = [(target, target_nonmembers)] + ([base] if base is not None else [])
    on_members, on_nonmembers = frequencies or (None, None)
    entries = []
    for level in levels:
        zbytes = zlib_lengths(member_records + nonmember_records, level)
        inputs = [[AttackInputs(scores, level_positions(scores, level), zb, ref, k, freq, dc_pdd_a)
                   for scores, zb, ref, freq in (
                       (members, zbytes[:len(member_records)], reference_members, on_members),
                       (nonmembers, zbytes[len(member_records):], reference_nonmembers, on_nonmembers))]
                  for members, nonmembers in models]
        for name in names:
            scores, *base_scores = _attack_scores(name, inputs, model_scores, len(models), level,
                                                  has_reference, frequencies is not None)
            keep = ~np.isnan(scores)
            for other in base_scores:
                keep &= ~np.isnan(other)
            if keep[is_member].sum() == 0 or keep[~is_member].sum() == 0:
                continue  # e.g. no sensitive tokens on one side: nothing to compare
            metrics = roc_metrics(scores[keep], is_member[keep], fprs=fprs,
                                  base_scores=base_scores[0][keep] if base_scores else None, select=select[keep])
            entries.append({"attack": name, "level": level, "higher_is_member": True, **metrics})
    return entries


def _attack_scores(name: str, inputs: list[list[AttackInputs]], model_scores: dict[str, list[LevelScores]],
                   n_models: int, level: str, has_reference: bool, has_frequencies: bool) -> list[np.ndarray]:
    """One attack's scores on (members then non-members), per model (target, then base)."""
    if name in MODEL_ATTACKS:
        per_model = model_scores.get(name)
        if per_model is None or len(per_model) != n_models:
            raise PrivtuneError(f"the {name} attack needs the model: its scores were not computed",
                                "run it in a study (privtune run or audit), which passes the model")
        return [np.concatenate(scores[level]) for scores in per_model]
    attack = get_attack(name)
    if name == "reference" and not has_reference:
        raise PrivtuneError("the reference attack needs reference-model scores",
                            "leave attacks.mia.reference_model empty to use the base model")
    if name == "dc_pdd" and not has_frequencies:
        raise PrivtuneError("the dc_pdd attack needs a reference corpus's token frequencies",
                            "pass frequencies from privtune.attacks.token_frequency.reference_frequencies")
    return [np.concatenate([attack(x) for x in model]) for model in inputs]
