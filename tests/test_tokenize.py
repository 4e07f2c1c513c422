import pytest

from privtune.data.records import Record, Span
from privtune.data.tokenize import encode_records, token_mask
from privtune.models.tiny import tiny_tokenizer


def test_mask_marks_exactly_the_tokens_overlapping_spans():
    tok = tiny_tokenizer()
    rec = Record("r", "p", "Email jane.doe@example.com now please", [Span(6, 26, "EMAIL")])
    enc = tok(rec.text, return_offsets_mapping=True)
    mask = token_mask(enc["offset_mapping"], rec)
    for (start, end), bit in zip(enc["offset_mapping"], mask):
        assert bit == (start < 26 and end > 6)
    covered = "".join(rec.text[s:e] for (s, e), b in zip(enc["offset_mapping"], mask) if b)
    assert "jane.doe@example.com" in covered


def test_encode_pads_truncates_and_aligns():
    tok = tiny_tokenizer()
    recs = [Record("a", "a", "short", []), Record("b", "b", "a much longer record " * 20, [Span(2, 6, "NAME")])]
    data = encode_records(recs, tok, max_length=16)
    assert data.input_ids.shape == (2, 16)
    assert data.attention_mask[1].sum() == 16
    assert (data.labels[0][data.attention_mask[0] == 0] == -100).all()
    assert data.sensitive[1].any() and not data.sensitive[0].any()
    sub = data.subset([1])
    assert sub.records[0].id == "b" and sub.input_ids.shape == (1, 16)


def test_slow_tokenizer_is_rejected():
    class Slow:
        is_fast = False

    from privtune.errors import PrivtuneError

    with pytest.raises(PrivtuneError, match="fast tokenizer"):
        encode_records([Record("a", "a", "x", [])], Slow(), 8)
