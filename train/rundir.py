"""A run directory belongs to one run: claiming it, checking resumed settings, publishing the export.

A run directory (`train.output_dir`) holds `run.json` (the run's id), `config.json`,
`metrics.jsonl`, `checkpoints/step-XXXXXXX/` and, once the run finished, `export/`. The rules:
- A fresh run never starts in a directory that holds another run's files: that is an error (resume
  it with `--resume`, pick another directory, or pass `--train.overwrite true` to replace it).
- Checkpoint rotation deletes only checkpoints of this run (`meta.json` carries the run id).
- A resumed run compares its settings with those its checkpoint was written with: settings that do
  not change the arithmetic (`MAY_CHANGE`) apply; any other difference is an error naming each one,
  unless `--train.allow_config_change true` applies them deliberately, with a warning.
- The export is written to a temporary directory and renamed into place with `export.json` (the
  completion marker) inside; a directory without the marker is never a finished export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
EXPORT_MARKER = "export.json"

MAY_CHANGE = (
    "export.answer_instruction",
    "train.max_steps",
    "train.epochs",
    "train.stop_after",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.tensorboard",
    "train.resume",
    "train.overwrite",
    "train.allow_config_change",
    "train.output_dir",
    "model.gradient_checkpointing",
    "model.compile",
    "export.",
)
"""Settings (dotted prefixes) a resumed run may change: length, logging, saving, memory, export."""

WORK = ("checkpoints", "metrics.jsonl", "export")
"""What a run leaves that another run must not take over: its checkpoints, metrics and export."""
_ALSO_REMOVED = ("tb", "skipped*.jsonl")  # glob patterns


class RunDirError(ValueError):
    """A run directory that this run may not use as asked; the message says what to do instead."""


def run_work(output_dir: Path) -> list[str]:
    """The names of WORK present (non-empty) in output_dir."""
    present = []
    for name in WORK:
        path = output_dir / name
        if path.is_dir() and any(path.iterdir()) or path.is_file() and path.stat().st_size > 0:
            present.append(name)
    return present


def read_run_id(output_dir: Path) -> str | None:
    """The id in output_dir/run.json, or None."""
    path = output_dir / RUN_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def claim(
    output_dir: Path, resumed_run_id: str | None, resuming: bool, overwrite: bool
) -> tuple[str, list[str]]:
    """Check that this run may use output_dir (read-only: every rank runs it, so all fail alike).

    resuming: a checkpoint is being resumed, with run id resumed_run_id (None when it was written
    before run ids existed). A fresh run may only use a directory without work; a resumed run may
    not use one owned by another run. Returns (the run id, the names of another run's work that
    `write_claim` deletes: only with overwrite, else that work is an error).
    """
    exists = output_dir.is_dir()
    present = run_work(output_dir) if exists else []
    owner = read_run_id(output_dir) if exists else None
    if resuming:
        foreign = owner is not None and resumed_run_id is not None and owner != resumed_run_id
        other = present if foreign else []
    else:
        other = present
    if other and not overwrite:
        raise RunDirError(
            f"{output_dir} holds another run ({', '.join(other)}): resume it with --resume, choose another "
            "--train.output_dir, or pass --train.overwrite true to delete that run and start anew"
        )
    run_id = resumed_run_id or (owner if resuming else None) or uuid.uuid4().hex
    return run_id, other


def write_claim(output_dir: Path, run_id: str, delete: list[str]) -> None:
    """Rank 0: delete the other run's work that `claim` allowed to replace, and write run.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if delete:
        paths = [output_dir / name for name in delete]
        paths += [p for pattern in _ALSO_REMOVED for p in output_dir.glob(pattern)]
        for path in paths:
            logger.warning("train.overwrite: deleting %s of the previous run", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    info = {"run_id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid()}
    (output_dir / RUN_FILE).write_text(json.dumps(info, indent=1) + "\n")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} of a nested config dict (lists kept whole, except lists of dicts: "teachers.0.name")."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        out = {f"{prefix}len": len(tree)}
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: dict, current: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every setting that differs and may not change on resume.

    defaults: the settings' default values; a setting the checkpoint does not know (added by a newer
    version) that is at its default is no change: the older version behaved as its default.
    """
    old, new, default = flatten(saved), flatten(current), flatten(defaults or {})
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(MAY_CHANGE) or old.get(key) == new.get(key):
            continue
        if key not in old and key in default and new.get(key) == default[key]:
            continue
        changes.append((key, old.get(key, "(unset)"), new.get(key, "(unset)")))
    return changes


def check_resume_config(
    saved: dict | None, current: dict, checkpoint: Path, allow: bool, defaults: dict | None = None
) -> list[str]:
    """Refuse (or, with allow, report) settings that differ from those the checkpoint was written with.

    Returns the changed keys (applied deliberately when allowed).
    """
    if saved is None:
        logger.warning(
            "%s holds no config.json (written by an older version): settings not compared", checkpoint
        )
        return []
    changes = config_changes(saved, current, defaults)
    if not changes:
        return []
    lines = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes)
    if not allow:
        raise RunDirError(
            f"resuming {checkpoint} with other settings than it was written with:\n{lines}\n"
            "a resumed run would not be the run these settings describe: undo the changes, start a new run "
            "in another --train.output_dir, or pass --train.allow_config_change true to apply them "
            "from here on (the run is then no longer exactly reproducible)"
        )
    logger.warning("resuming %s with changed settings, applied from here on:\n%s", checkpoint, lines)
    return [key for key, _, _ in changes]


def is_complete_export(path: Path) -> bool:
    """Whether path is an export this trainer finished writing (its completion marker is there)."""
    return (path / EXPORT_MARKER).is_file()


def publish_export(final: Path, write: Callable[[Path], None], info: dict[str, Any]) -> None:
    """Write an export through write(tmp_dir), add the marker, then move it to `final` in one rename.

    A kill at any moment leaves either the previous complete export or the new one at `final`, plus
    at most a stale `.tmp-<name>` directory (removed by the next publish).
    """
    tmp = final.parent / f".tmp-{final.name}"
    old = final.parent / f".old-{final.name}"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / EXPORT_MARKER).write_text(json.dumps(info, indent=1) + "\n")
    if final.exists():
        final.rename(old)  # the previous export stays whole until the new one is in place
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
