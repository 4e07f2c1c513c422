"""Auditing a model privtune did not train, and exporting the data to train it on.

A team that fine-tunes with its own pipeline can still take privtune's measurements:
``privtune data export`` writes the study's split, they train on ``train.jsonl`` however
they like, and ``privtune audit MODEL`` measures the result exactly like a run of the
study (leakage and utility against the base model, canary exposure, every attack). The
audited model is stored with role ``audit``, so the report places it beside the study's
own runs. The same command re-attacks a run's saved artifact under new attack settings
without training anything: ``privtune audit privtune-runs/artifacts/<run_id> study.yaml``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer

from privtune.config import StudyConfig, config_hash
from privtune.data.records import Record
from privtune.errors import PrivtuneError
from privtune.files import private_dir, private_file
from privtune.measures.efficiency import count_parameters
from privtune.models.loading import check_safetensors, load_model
from privtune.study import attacking
from privtune.study.dataset import StudyRecords, build_study_records
from privtune.study.plan import plan_study, shared_config

AUDIT_ROLE = "audit"
AUDIT_METHOD = "audit"


def export_study_data(cfg: StudyConfig, out_dir: str | Path, recs: StudyRecords | None = None) -> dict[str, int]:
    """Write ``train.jsonl`` (members, canary copies, poison), ``members.jsonl`` and
    ``nonmembers.jsonl`` of ``recs`` (default: the study's) in the format ``data.source``
    reads, readable by their owner only (they hold the whole training text); returns
    records per file."""
    recs = recs if recs is not None else build_study_records(cfg)
    out_dir = private_dir(out_dir)
    files = {"train.jsonl": recs.train, "members.jsonl": recs.members, "nonmembers.jsonl": recs.nonmembers}
    for name, records in files.items():
        path = out_dir / name
        path.unlink(missing_ok=True)  # a file left by an earlier export may be readable by others
        with open(private_file(path), "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(_row(record), ensure_ascii=False) + "\n")
    return {name: len(records) for name, records in files.items()}


def _row(record: Record) -> dict:
    spans = [{"start": s.start, "end": s.end, "label": s.label} for s in record.spans]
    return {"id": record.id, "individual": record.individual, "text": record.text, "spans": spans}


def audit_label(cfg: StudyConfig, model_ref: str, label: str | None) -> str:
    """The audited model's name in the study; it may not hide one of the study's runs."""
    label = label or Path(model_ref.rstrip("/")).name or model_ref
    taken = {spec.label for spec in plan_study(cfg)}
    if label in taken or label.startswith("shadow-"):
        raise PrivtuneError(f"audit label {label!r} is already a run of study {cfg.name!r}",
                            "pick another name with --label")
    return label


def load_audited_model(ctx, model_ref: str) -> torch.nn.Module:
    """A PEFT adapter directory on top of the study's base model, or a whole model
    (registered name or checkpoint directory) with the base model's tokenizer."""
    path = Path(model_ref)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        check_safetensors(path)  # also checked before the audit starts; the files may change meanwhile

        if (path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(path)
            attacking.check_same_tokenizer(ctx.loaded.tokenizer, tokenizer, model_ref, role="audited model")
        try:
            # is_trainable marks the adapter's weights, so the audit counts them as trained.
            model = PeftModel.from_pretrained(copy.deepcopy(ctx.loaded.model), path, is_trainable=True)
        except (ValueError, RuntimeError, KeyError) as e:
            raise PrivtuneError(f"adapter {model_ref} does not fit the study's model {ctx.cfg.model}: "
                                f"{str(e).splitlines()[0]}", "audit it with the study config it was trained in") from None
    else:
        loaded = load_model(model_ref)
        attacking.check_same_tokenizer(ctx.loaded.tokenizer, loaded.tokenizer, model_ref, role="audited model")
        model = loaded.model
    return model.to(ctx.runtime.device).eval()


def audit_model(ctx, model: torch.nn.Module, model_ref: str) -> dict:
    """The result of an audit run: the same measures and attacks as a trained run."""
    evaluation = ctx.evaluate(model)
    trainable, total = count_parameters(model)
    return {
        "final": evaluation.measures,
        "epochs": [],
        "exposure": ctx.exposure(model),
        "attacks": ctx.attack(model, evaluation),
        "record_stats": attacking.record_stats(evaluation, ctx),
        "dp": None,
        # valid for a model trained on the exported train.jsonl, which holds the IN audit canaries
        "empirical_epsilon": ctx.privacy_audit(model, None),
        "efficiency": {"train_seconds": math.nan, "seconds_per_epoch": math.nan, "tokens_per_second": math.nan,
                       "steps": 0, "tokens": 0, "peak_memory_bytes": math.nan, "memory_kind": "none",
                       "trainable_params": trainable, "total_params": total, "flops_estimate": math.nan,
                       "device": str(ctx.runtime.device), "precision": ctx.runtime.precision},
        "artifact": model_ref,
        "data": ctx.data.summary(),
        **ctx.provenance,
    }


def audit_config(cfg: StudyConfig, model_ref: str, label: str) -> tuple[str, dict]:
    """Run id and stored config of an audit: the study's shared settings plus the model."""
    where = str(Path(model_ref).resolve()) if Path(model_ref).exists() else model_ref
    run_cfg = {**shared_config(cfg), "method": {"method": AUDIT_METHOD, "label": label}, "audited_model": where}
    return config_hash(run_cfg), run_cfg

