"""Rerun an archived config.json and check that every metric and every prediction matches the original.

Only a run that succeeded, with its files as its manifest.json recorded them, is reproduced: a damaged or edited
original would turn a faithful rerun into a MISMATCH (or an edited config into a false MATCH)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline.errors import UserError
from qlora_pipeline.integrity import verify_manifest
from qlora_pipeline.runs import flatten, read_json, run_state

if TYPE_CHECKING:
    from qlora_pipeline.config import Config


def locate_archive(path: str | Path) -> tuple[Path, Path]:
    """Return (run directory, config.json) for a run directory or the path of its config.json."""
    path = Path(path)
    config_json = path / "config.json" if path.is_dir() else path
    if not config_json.is_file():
        raise UserError(
            f"no archived config at {config_json}: pass a run directory (outputs/run_XXX) or its config.json"
        )
    return config_json.parent, config_json


def load_archived_config(config_json: Path) -> Config:
    """The config a run archived; settings it predates take the values it ran with (`config.upgrade_archived`)."""
    return load_archive(config_json)[0]


def load_archive(config_json: Path) -> tuple[Config, dict[str, Any]]:
    """The config a run archived (as `load_archived_config`) and config.json's whole record, read once."""
    from qlora_pipeline.config import Config, upgrade_archived

    try:
        record = read_json(config_json)
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_json} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
    if not isinstance(record, dict) or "config" not in record:
        raise UserError(f"{config_json} is not a qlora run archive (no 'config' key)")
    if not isinstance(record["config"], dict):
        raise UserError(f"{config_json}: 'config' is not a mapping of sections")
    return Config.from_dict(upgrade_archived(record["config"])), record


def check_original(run_dir: Path) -> None:
    """The run to reproduce succeeded (a dead `running` one reads as interrupted) and its files are as it left them."""
    status = run_state(run_dir)
    state = status.get("state")
    if state != "succeeded":
        why = f" ({status['error']})" if status.get("error") else ""
        raise UserError(
            f"{run_dir} is {state or 'without a status.json'}{why}: only a run that succeeded has the metrics and "
            "predictions a reproduction is checked against (qlora resume continues an interrupted qlora run)"
        )
    verify_manifest(run_dir)


def check_processes(run_dir: Path, record: dict[str, Any]) -> None:
    """A QLoRA run reproduces on as many processes as trained it (torchrun / accelerate launch): the batch of an
    optimizer step and each process's share of the data depend on that number. Refused before anything runs.
    `record`: the run's config.json (`load_archive`)."""
    from qlora_pipeline.distributed import world_size

    trained_on = (record.get("training") or {}).get("world_size", 1)
    if trained_on != world_size():
        launch = "plain `qlora reproduce`" if trained_on == 1 else f"torchrun --nproc_per_node {trained_on}"
        raise UserError(
            f"{run_dir} was trained on {trained_on} process(es) and this reproduction has {world_size()}; "
            f"reproduce it with the same number ({launch})"
        )


def compare_runs(original: Path, new: Path) -> dict[str, Any]:
    """Compare data fingerprint, every metric and every predictions.csv (an sft run: generations.jsonl) byte for
    byte."""
    checks = [compare_fingerprint(original, new), compare_metrics(original, new)]
    originals = sorted(p.relative_to(original) for p in original.glob("*/*/predictions.csv"))
    for relative in originals:
        checks.append(compare_predictions(original / relative, new / relative, relative.as_posix()))
    generations = sorted(p.relative_to(original) for p in original.glob("*/*/generations.jsonl"))
    for relative in generations:
        checks.append(compare_generations(original / relative, new / relative, relative.as_posix()))
    if not originals and not generations:
        checks.append({"what": "predictions", "match": False, "detail": "the original run has no predictions.csv"})
    return {"original": str(original), "matches": all(c["match"] for c in checks), "checks": checks}


def compare_generations(before: Path, after: Path, name: str) -> dict[str, Any]:
    """An sft run's answers, line by line."""
    if not after.is_file():
        return {"what": name, "match": False, "detail": "missing in the reproduced run"}
    old, new = (path.read_text(encoding="utf-8").splitlines() for path in (before, after))
    if old == new:
        return {"what": name, "match": True, "detail": f"{len(old)} answers, byte-identical"}
    differing = sum(a != b for a, b in zip(old, new, strict=False)) + abs(len(old) - len(new))
    return {"what": name, "match": False, "detail": f"{differing} of {len(old)} lines differ"}


def compare_fingerprint(original: Path, new: Path) -> dict[str, Any]:
    before = (read_json(original / "data_summary.json", optional=True) or {}).get("fingerprint")
    after = (read_json(new / "data_summary.json", optional=True) or {}).get("fingerprint")
    detail = f"{str(after)[:16]}…" if before == after else f"{str(before)[:16]}… vs {str(after)[:16]}…"
    return {"what": "data fingerprint", "match": before is not None and before == after, "detail": detail}


def compare_metrics(original: Path, new: Path) -> dict[str, Any]:
    before, after = read_json(original / "metrics.json", optional=True), read_json(new / "metrics.json", optional=True)
    if before is None:
        return {"what": "metrics.json", "match": False, "detail": "missing in the original run"}
    differing = sorted(set(flatten(before).items()) ^ set(flatten(after or {}).items()))
    names = sorted({key for key, _ in differing})
    detail = "all identical" if not names else f"{len(names)} differ, e.g. {', '.join(names[:3])}"
    return {"what": "metrics.json", "match": not names, "detail": detail}


def compare_predictions(before: Path, after: Path, name: str) -> dict[str, Any]:
    if not after.is_file():
        return {"what": name, "match": False, "detail": "missing in the reproduced run"}
    if before.read_bytes() == after.read_bytes():
        rows = sum(1 for _ in before.open(encoding="utf-8")) - 1
        return {"what": name, "match": True, "detail": f"{rows} rows, byte-identical"}
    import pandas as pd

    old, new = pd.read_csv(before), pd.read_csv(after)
    if len(old) != len(new) or list(old.columns) != list(new.columns):
        return {"what": name, "match": False, "detail": f"shape {old.shape} vs {new.shape}"}
    changed = int((old["prediction"] != new["prediction"]).sum())
    prob_columns = [c for c in old.columns if c.startswith("prob_")]
    largest = float((old[prob_columns] - new[prob_columns]).abs().to_numpy().max())
    return {
        "what": name,
        "match": False,
        "detail": f"{changed} of {len(old)} predictions differ; largest probability difference {largest:.3g}",
    }
