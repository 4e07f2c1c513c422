"""A coloured look at records and their sensitive spans, for ``privtune data preview``.

Before fine-tuning on someone's data it is worth seeing what the study will treat as
sensitive: every span is highlighted in its label's colour and followed by the label,
so a missed name or a phone tagged as an account number is visible at a glance.
"""

from __future__ import annotations

from collections import Counter

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from privtune.data.records import Record

LABEL_STYLES: dict[str, str] = {
    "NAME": "bold black on bright_cyan", "EMAIL": "bold black on bright_green",
    "PHONE": "bold black on bright_yellow", "ADDRESS": "bold black on bright_magenta",
    "ACCOUNT": "bold white on blue", "ORDER": "bold white on dark_green", "CARD": "bold white on red",
    "DOB": "bold black on orange1", "DATE": "bold black on orange1", "IBAN": "bold white on purple",
    "CITY": "bold black on plum1", "UNIVERSITY": "bold black on light_sky_blue1",
    "EMPLOYER": "bold black on khaki1", "NATIONAL_ID": "bold white on dark_red",
}
FALLBACK_STYLES = ("bold black on grey70", "bold white on grey35", "bold black on wheat1", "bold white on teal")


def label_style(label: str) -> str:
    """The highlight for ``label``; unknown labels get a stable fallback colour."""
    return LABEL_STYLES.get(label) or FALLBACK_STYLES[sum(map(ord, label)) % len(FALLBACK_STYLES)]


def record_text(record: Record) -> Text:
    """The record's text with each span highlighted and tagged ``[LABEL]``."""
    out = Text()
    pos = 0
    for s in record.spans:
        out.append(record.text[pos : s.start])
        out.append(record.text[s.start : s.end], style=label_style(s.label))
        out.append(f"[{s.label}]", style="dim " + label_style(s.label).split(" on ")[-1])
        pos = s.end
    out.append(record.text[pos:])
    return out


def _n_spans(record: Record) -> str:
    n = len(record.spans)
    return f"{n} span" if n == 1 else f"{n} spans"


def preview_renderable(records: list[Record], limit: int = 5) -> RenderableType:
    """The first ``limit`` records as panels, with a label legend and a count of the rest."""
    shown = records[:limit]
    counts = Counter(s.label for r in records for s in r.spans)
    legend = Text("labels: ")
    for label, n in sorted(counts.items()):
        legend.append(f" {label} ", style=label_style(label)).append(f" {n}  ")
    if not counts:
        legend.append("none (no sensitive spans)", style="bold red")
    # Text, not str: ids come from the user's file, and a str title would be read as Rich markup.
    panels = [Panel(record_text(r), title=Text(r.id), subtitle=Text(f"individual {r.individual}, {_n_spans(r)}"),
                    title_align="left", subtitle_align="right") for r in shown]
    parts: list[RenderableType] = [legend, *panels]
    if len(records) > len(shown):
        parts.append(Text(f"... and {len(records) - len(shown)} more records", style="dim"))
    return Group(*parts)
