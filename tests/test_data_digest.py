"""The built-in data are a function of the seed and privtune's version: the default
study's data and the tiny tokenizer hash to stored digests, also under a clock moved to
another year; a digest sees every change that can move a figure."""

import dataclasses
import json
from importlib import resources

import pytest

from privtune.config import load_config
from privtune.data.digest import DataDigests, tokenizer_digest
from privtune.models.tiny import TOKENIZER_FILE, tiny_tokenizer, train_tiny_tokenizer
from privtune.study.dataset import build_study_records

#: ``privtune data export`` of the default study (members and non-members as split, with
#: spans and metadata; canaries; tagger). A new value is new default data: it belongs in
#: a new privtune version, with the README's copy of it.
DEFAULT_RECORDS = "66007bc5b34c5bba059cea5296569c6a8f210a0e58f50bf4d584f5843095298a"
#: The shipped tiny tokenizer's definition.
TINY_TOKENIZER = "1e9187ebb8774e08ade34f255ce193c4f102385718b76093e6b6a26c2525f390"


def shipped_tokenizer() -> dict:
    return json.loads(resources.files("privtune.models").joinpath(TOKENIZER_FILE).read_text(encoding="utf-8"))


@pytest.mark.parametrize("days", [0, 400, -3 * 365 - 40])  # today, next year, three years back
def test_default_data_and_tiny_tokenizer_hash_to_their_stored_digests(shift_clock, days):
    build_study_records(load_config())  # faker's locale modules loaded before the clock moves
    shift_clock(days)
    assert build_study_records(load_config()).digest() == DEFAULT_RECORDS
    assert tokenizer_digest(tiny_tokenizer()) == TINY_TOKENIZER
    # The documented way to rebuild the shipped file gives the shipped file, whatever the date.
    assert json.loads(train_tiny_tokenizer()) == shipped_tokenizer()


def test_the_tiny_tokenizer_is_package_data():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert f"models/{TOKENIZER_FILE}" in pyproject["tool"]["setuptools"]["package-data"]["privtune"]
    assert len(shipped_tokenizer()["model"]["vocab"]) == 512


def test_records_digest_sees_text_spans_split_canaries_and_tagger():
    cfg = load_config().model_copy(update={"data": load_config().data.model_copy(update={"n_individuals": 12})})
    recs = build_study_records(cfg)
    base = recs.digest()
    assert base == build_study_records(cfg).digest()  # deterministic
    first = recs.members[0]
    changes = [
        dataclasses.replace(recs, members=[dataclasses.replace(first, text=first.text + " ")] + recs.members[1:]),
        dataclasses.replace(recs, members=[dataclasses.replace(first, spans=first.spans[1:])] + recs.members[1:]),
        dataclasses.replace(recs, members=recs.members[1:], nonmembers=[first] + recs.nonmembers),  # the split
        dataclasses.replace(recs, canaries=recs.canaries[1:]),
        dataclasses.replace(recs, tagger="regex"),
    ]
    digests = [c.digest() for c in changes]
    assert base not in digests and len(set(digests)) == len(digests)


def test_tokenizer_digest_ignores_padding_state_but_not_the_vocabulary():
    tok = tiny_tokenizer()
    before = tokenizer_digest(tok)
    tok(["a short one", "and a somewhat longer text"], padding=True, truncation=True, max_length=8)
    assert tok.backend_tokenizer.padding is not None  # transformers left its padding state behind
    assert tokenizer_digest(tok) == before
    tok.add_tokens(["<new-token>"])
    assert tokenizer_digest(tok) != before
    assert DataDigests("a", before).data != DataDigests("a", tokenizer_digest(tok)).data
