import csv
import json

import pytest

from privtune.data.loaders import load_records
from privtune.data.records import Span
from privtune.errors import PrivtuneError


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def write_csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


GOOD = [
    {"text": "Call Ann Lee on 555-0101.", "spans": [{"start": 16, "end": 24, "label": "PHONE"},
                                                  {"start": 5, "end": 12, "label": "NAME"}],
     "individual": "ann", "id": "t1"},
    {"text": "No spans here, tag me."},
    {"text": "Explicitly nothing sensitive.", "spans": [], "individual": 7},
]


def test_jsonl_fields_defaults_and_sorted_spans(tmp_path):
    records = load_records(write_jsonl(tmp_path / "data.jsonl", GOOD[:1] + [""] + GOOD[1:]))
    a, b, c = records
    assert (a.id, a.individual, a.meta) == ("t1", "ann", {"spans_given": True})
    assert a.spans == [Span(5, 12, "NAME"), Span(16, 24, "PHONE")]
    assert a.span_values() == [("NAME", "Ann Lee"), ("PHONE", "555-0101")]
    assert (b.id, b.individual, b.spans, b.meta) == ("data-3", "data-3", [], {"spans_given": False})
    assert (c.id, c.individual, c.spans, c.meta["spans_given"]) == ("data-4", "7", [], True)


def test_csv_with_json_spans_column(tmp_path):
    path = write_csv(tmp_path / "tickets.csv", ["id", "text", "spans", "individual"], [
        ["", "Mail bo@x.org today", json.dumps([{"start": 5, "end": 13, "label": "EMAIL"}]), "bo"],
        ["r2", "a line, with a comma\nand a newline", "", ""],
        ["", "third", "[]", "p3"],
    ])
    a, b, c = load_records(path)
    assert (a.id, a.individual, a.span_values()) == ("tickets-2", "bo", [("EMAIL", "bo@x.org")])
    assert (b.id, b.individual, b.text, b.meta["spans_given"]) == ("r2", "r2", "a line, with a comma\nand a newline", False)
    assert (c.id, c.spans, c.meta["spans_given"]) == ("tickets-5", [], True)  # line numbers count physical lines


def test_csv_with_only_a_text_column_and_bom(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("\ufefftext\nfirst\nsecond\n", encoding="utf-8")
    assert [r.text for r in load_records(path)] == ["first", "second"]


def error(path) -> str:
    with pytest.raises(PrivtuneError) as e:
        load_records(path)
    return str(e.value)


def test_missing_file_and_unknown_extension(tmp_path):
    assert "not found" in error(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("hello")
    msg = error(tmp_path / "data.txt")
    assert "unknown extension '.txt'" in msg and ".jsonl" in msg


@pytest.mark.parametrize("bad_line,expected", [
    ('{"text": "broken', "line 3 of data.jsonl is not valid JSON"),
    ('["a list"]', "line 3 of data.jsonl is a JSON list, not an object"),
    ('{"id": "x"}', "line 3 of data.jsonl has no text"),
    ('{"text": "   "}', "line 3 of data.jsonl has no text"),
    ('{"text": 5}', "line 3 of data.jsonl: text must be a string"),
    ('{"text": "abc", "spans": {"start": 0}}', "line 3 of data.jsonl: spans must be a list"),
    ('{"text": "abc", "spans": [{"start": 0, "end": 2}]}', "line 3 of data.jsonl: span 0 needs start, end and label"),
    ('{"text": "abc", "spans": [{"start": "0", "end": 2, "label": "X"}]}', "line 3 of data.jsonl: span 0 start and end must be integers"),
    ('{"text": "abc", "spans": [{"start": 0.5, "end": 2, "label": "X"}]}', "must be integers"),
    ('{"text": "abc", "spans": [{"start": 0, "end": 2, "label": ""}]}', "span 0 has an empty or non-string label"),
    ('{"text": "abc", "spans": [{"start": 0, "end": 4, "label": "X"}]}', "line 3 of data.jsonl: span 0 (0, 4) lies outside the text of 3"),
    ('{"text": "abc", "spans": [{"start": -1, "end": 2, "label": "X"}]}', "span 0 (-1, 2) lies outside"),
    ('{"text": "abc", "spans": [{"start": 2, "end": 2, "label": "X"}]}', "span 0 (2, 2) lies outside"),
    ('{"text": "abcdef", "spans": [{"start": 3, "end": 5, "label": "X"}, {"start": 0, "end": 4, "label": "Y"}]}',
     "line 3 of data.jsonl: spans (0, 4) and (3, 5) overlap"),
    ('{"text": "abc", "id": "t1"}', "line 3 of data.jsonl repeats id 't1' (first on line 1)"),
    ('{"text": "abc", "individual": [1]}', "line 3 of data.jsonl: individual must be a string or an integer"),
])
def test_jsonl_errors_name_the_line(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[0], GOOD[1], bad_line, GOOD[2]])
    msg = error(path)
    assert expected in msg
    assert msg.count(";") >= 1 and msg.endswith(".")  # problem; fix.


@pytest.mark.parametrize("row,expected", [
    (["", "[]"], "line 3 of data.csv has no text"),
    (["abc", "[{oops"], "line 3 of data.csv: the spans column is not valid JSON"),
    (["abc", json.dumps([{"start": 1, "end": 9, "label": "X"}])], "line 3 of data.csv: span 0 (1, 9) lies outside"),
    (["abc", "[]", "extra"], "line 3 of data.csv has more fields than the header"),
])
def test_csv_errors_name_the_line(tmp_path, row, expected):
    path = write_csv(tmp_path / "data.csv", ["text", "spans"], [["fine", ""], row, ["also fine", ""]])
    assert expected in error(path)


def test_csv_without_text_column(tmp_path):
    path = write_csv(tmp_path / "data.csv", ["body"], [["a"], ["b"]])
    assert "has no 'text' column (header: body)" in error(path)


def test_fewer_than_two_records(tmp_path):
    assert "holds 1 record(s)" in error(write_jsonl(tmp_path / "one.jsonl", [{"text": "only"}]))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "holds 0 record(s)" in error(tmp_path / "empty.jsonl")


def test_not_utf8(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "x"}\n')
    assert "is not UTF-8" in error(tmp_path / "latin.jsonl")
