"""The report's "Federated clients" section: one row per client of every federated run.

A federated model is one model and is measured like any other above; what only a
federation has is how its leakage falls on the data holders: a client whose records the
model fits much better than the base leaks its own people most, and a non-iid split
can concentrate that on a few clients. The table gives each client's records,
individuals and rounds taken part in, its CE_S and leakage gain on its own member
records, and (for ``dp-`` methods) the epsilon of its local DP-SGD; the note under the
heading gives each run's split, rounds, bytes communicated and client-level epsilon.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from privtune.report.plots import is_done, styles, unit_noun


def _fed(run: dict) -> dict:
    return run.get("federated") or {}


def _fmt(value, spec: str = ".3f") -> str:
    from privtune.report.html import (
        fmt,  # html imports this module: import its formatters on use
    )

    return fmt(value, spec)


def _bytes(value) -> str:
    from privtune.report.html import fmt_bytes

    return fmt_bytes(value)


def _run_note(run: dict) -> str:
    fed = _fed(run)
    split = fed.get("split", "?") + (f" (alpha {fed['alpha']:g})" if fed.get("alpha") is not None else "")
    cdp = fed.get("client_dp") or {}
    privacy = (f", client-level ε {cdp['epsilon']:.3g} at δ {cdp['delta']:.2g} (noise {cdp['noise_multiplier']:.3g}, "
               f"clip {cdp['clip_norm']:g})" if cdp else "")
    return (f"{run.get('label')}: {fed.get('clients')} clients, {split}, {fed.get('rounds')} rounds of "
            f"{fed.get('local_epochs')} local epoch(s), {_bytes(fed.get('bytes_down'))} down and "
            f"{_bytes(fed.get('bytes_up'))} up{privacy}.")


def _local_epsilon(client: dict) -> str:
    """A client's local ε with the unit it covers ("7.9 per person"); clients stored
    before the unit was recorded ran per record."""
    eps = _fmt(client.get("epsilon"), ".3g")
    if client.get("epsilon") is None:
        return eps
    return escape(f"{eps} per {unit_noun(client.get('unit'))}")


def federated_section(runs: Sequence[dict]) -> str:
    """Per-client leakage of every finished federated run (empty when there is none)."""
    colors = {id(r): s.color for r, s in zip(runs, styles(runs))}
    federated = [r for r in runs if is_done(r) and _fed(r)]
    if not federated:
        return ""
    with_eps = any(c.get("epsilon") is not None for r in federated for c in _fed(r).get("per_client", []))
    head = ("<tr><th>run</th><th>client</th><th>records</th><th>individuals</th><th>rounds</th><th>kinds</th>"
            "<th title=\"CE_S of the model on the client's own member records, nats\">CE_S\u00a0↑</th>"
            "<th title=\"CE_S(base) − CE_S(model) on the client's member records, nats\">leakage gain\u00a0↓</th>"
            + ("<th title=\"ε of the client's local DP-SGD over its own data, per person or per record\">"
               "local ε\u00a0↓</th>" if with_eps else "")
            + "</tr>")
    rows = []
    for run in federated:
        swatch = f'<span class="swatch" style="background:{colors[id(run)]}"></span>'
        clients = _fed(run).get("per_client", [])
        worst = max((c.get("leakage_gain") for c in clients if c.get("leakage_gain") is not None), default=None)
        for c in clients:
            mark = ' class="worst"' if len(clients) > 1 and c.get("leakage_gain") == worst else ""
            rows.append(
                f'<tr><td class="label">{swatch}{escape(str(run.get("label")))}</td><td>{c.get("client")}</td>'
                f'<td>{c.get("records")}</td><td>{c.get("individuals")}</td><td>{c.get("rounds")}</td>'
                f'<td>{escape(", ".join(c.get("kinds") or [])) or "–"}</td><td>{_fmt(c.get("ce_s_train"))}</td>'
                f'<td{mark}>{_fmt(c.get("leakage_gain"))}</td>'
                + (f'<td>{_local_epsilon(c)}</td>' if with_eps else "") + "</tr>")
    note = ("Each client holds the records of its own individuals (canary copies stay with one client, poisoned "
            "records with the member they copy). Leakage per client is measured on that client's member records "
            "against the base model; the client that leaks most is shaded. " + " ".join(map(_run_note, federated)))
    return (f'<section id="federated"><h2>Federated clients</h2><p class="note">{escape(note)}</p>'
            f'<div class="wide"><table class="side"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
            f'</div></section>')
