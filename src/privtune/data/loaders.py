"""Read the user's own records from JSONL or CSV, checking every field on the way in.

Each row has a ``text`` and optionally ``spans`` (a list of ``{"start", "end",
"label"}``; in CSV a JSON string in a ``spans`` column), ``individual`` (the privacy
unit; default: the record id) and ``id`` (default ``"{file stem}-{line}"``). Rows
without spans are allowed: the PII tagger fills them later, and ``meta["spans_given"]``
tells which rows came with spans (an explicit empty list counts as given: "this row has
nothing sensitive").

Every problem is a :class:`PrivtuneError` that names the file and the line, because the
person reading it has the file open in an editor. Line numbers are physical lines; in
CSV the header is line 1.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from privtune.data.records import Record, Span
from privtune.errors import PrivtuneError

SUFFIXES = (".jsonl", ".csv")


def load_records(path: str | Path) -> list[Record]:
    """Records from a ``.jsonl`` or ``.csv`` file.

    Raises:
        PrivtuneError: missing file, unknown extension, unreadable line, missing or
            empty ``text``, malformed or out-of-range or overlapping spans, duplicate
            ids, or fewer than two records.
    """
    path = Path(path)
    if not path.is_file():
        raise PrivtuneError(f"data file {path} not found", "check the path, or use a built-in corpus: customer-sim, synbio")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PrivtuneError(f"cannot read {path.name}: unknown extension '{suffix or '(none)'}'",
                            "give a .jsonl file (one JSON object per line) or a .csv file with a text column")
    rows = _jsonl_rows(path) if suffix == ".jsonl" else _csv_rows(path)
    records: list[Record] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        record = _record(row, path, line)
        if record.id in seen:
            raise PrivtuneError(f"line {line} of {path.name} repeats id '{record.id}' (first on line {seen[record.id]})",
                                "give every record a unique id, or drop the id field")
        seen[record.id] = line
        records.append(record)
    if len(records) < 2:
        raise PrivtuneError(f"{path.name} holds {len(records)} record(s)",
                            "give at least two records (members and non-members need one each)")
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrivtuneError(f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start})",
                            "save the file as UTF-8") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(_read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PrivtuneError(f"line {line} of {path.name} is not valid JSON: {e.msg} (column {e.colno})",
                                "write one JSON object per line") from None
        if not isinstance(row, dict):
            raise PrivtuneError(f"line {line} of {path.name} is a JSON {type(row).__name__}, not an object",
                                'write one object per line, like {"text": "..."}')
        yield line, row


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    if reader.fieldnames is None or "text" not in reader.fieldnames:
        raise PrivtuneError(f"{path.name} has no 'text' column (header: {', '.join(reader.fieldnames or []) or 'empty'})",
                            "add a header row with a text column")
    line = reader.line_num  # the header's last line
    for row in reader:
        start, line = line + 1, reader.line_num
        if None in row:
            raise PrivtuneError(f"line {start} of {path.name} has more fields than the header",
                                "quote fields that contain commas")
        spans = row.get("spans")
        if spans is not None and spans.strip():
            try:
                row["spans"] = json.loads(spans)
            except json.JSONDecodeError as e:
                raise PrivtuneError(f"line {start} of {path.name}: the spans column is not valid JSON: {e.msg}",
                                    'write spans as a JSON list, like [{"start": 0, "end": 4, "label": "NAME"}]') from None
        else:
            row["spans"] = None
        yield start, {k: v for k, v in row.items() if v not in ("", None) or k == "text"}


def _record(row: dict[str, Any], path: Path, line: int) -> Record:
    where = f"line {line} of {path.name}"
    text = row.get("text")
    if text is not None and not isinstance(text, str):
        raise PrivtuneError(f"{where}: text must be a string, not {type(text).__name__}",
                            "give every record a non-empty text field")
    if text is None or not text.strip():
        raise PrivtuneError(f"{where} has no text", "give every record a non-empty text field")
    record_id = _name(row.get("id"), f"{path.stem}-{line}", where, "id")
    individual = _name(row.get("individual"), record_id, where, "individual")
    given = row.get("spans") is not None
    spans = _spans(row["spans"], text, where) if given else []
    return Record(record_id, individual, text, spans, {"spans_given": given})


def _name(value: Any, default: str, where: str, field: str) -> str:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PrivtuneError(f"{where}: {field} must be a string or an integer, not {type(value).__name__}",
                            f"write the {field} as a string")
    return str(value)


def _spans(raw: Any, text: str, where: str) -> list[Span]:
    """Validated spans, sorted by start."""
    if not isinstance(raw, list):
        raise PrivtuneError(f"{where}: spans must be a list, not {type(raw).__name__}",
                            'write spans like [{"start": 0, "end": 4, "label": "NAME"}]')
    spans = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not all(k in item for k in ("start", "end", "label")):
            raise PrivtuneError(f"{where}: span {i} needs start, end and label fields",
                                'write each span like {"start": 0, "end": 4, "label": "NAME"}')
        start, end, label = item["start"], item["end"], item["label"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            raise PrivtuneError(f"{where}: span {i} start and end must be integers, got {start!r} and {end!r}",
                                "give character offsets as whole numbers")
        if not isinstance(label, str) or not label.strip():
            raise PrivtuneError(f"{where}: span {i} has an empty or non-string label",
                                "label each span, e.g. NAME, EMAIL, PHONE")
        if not 0 <= start < end <= len(text):
            raise PrivtuneError(f"{where}: span {i} ({start}, {end}) lies outside the text of {len(text)} characters"
                                " or is empty", "use 0 <= start < end <= len(text), counting characters from 0")
        spans.append(Span(start, end, label))
    spans.sort(key=lambda s: (s.start, s.end))
    for a, b in zip(spans, spans[1:]):
        if b.start < a.end:
            raise PrivtuneError(f"{where}: spans ({a.start}, {a.end}) and ({b.start}, {b.end}) overlap",
                                "merge overlapping spans into one")
    return spans
