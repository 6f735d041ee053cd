"""Resumable checkpoints, written atomically: model, optimizer, scheduler, data position, RNG states.

Layout of one checkpoint (`output_dir/checkpoints/step-0000040/`):
    meta.json            step, world size, engine kind, run id (written last: its presence marks completeness)
    config.json          the run config the checkpoint was written with (compared on resume)
    train_state.pt       plain loop: model + optimizer state dicts
    ds/                  DeepSpeed loop: the engine's own (sharded) model + optimizer checkpoint
    scheduler.pt         LR scheduler state (same on every rank)
    rank-00000.pt        per rank: data position and RNG states

Everything is first written to `checkpoints/.tmp-step-0000040/` and then renamed (atomic on POSIX),
so a run killed mid-write leaves only a stale temporary directory, never a half checkpoint. Multi-node
runs need `output_dir` on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.distributed import DistInfo, barrier, broadcast_object

logger = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d{7})$")


def checkpoints_root(output_dir: str | Path) -> Path:
    """output_dir/checkpoints."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: "auto" = the latest one (None if there is none), or a path."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no meta.json in {path})")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    """A complete checkpoint's meta.json."""
    return json.loads((path / "meta.json").read_text())


def read_config(path: Path) -> dict[str, Any] | None:
    """The run config a checkpoint was written with (None for checkpoints of older versions)."""
    file = path / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, in a form torch.load(weights_only=True) reads back."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    dist_info: DistInfo,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank_state: dict[str, Any],
    run_id: str,
    config: dict[str, Any],
    ds_engine: Any = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` (every rank calls this); returns its final directory.

    Rotation keeps the `keep_last` newest checkpoints of this run (`run_id`) and never deletes one
    written by another run.
    """
    root = checkpoints_root(output_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if ds_engine is not None:
        # DeepSpeed writes its (possibly ZeRO-sharded) model + optimizer state from every rank.
        ds_engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    elif dist_info.is_main:
        torch.save(
            {"model": module.state_dict(), "optimizer": optimizer.state_dict()}, tmp / "train_state.pt"
        )
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank-{dist_info.rank:05d}.pt")
    if dist_info.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    barrier()
    if dist_info.is_main:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        meta = {
            "step": step,
            "world_size": dist_info.world_size,
            "deepspeed": ds_engine is not None,
            "run_id": run_id,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # a re-run of the same step (resume from an older checkpoint)
            shutil.rmtree(final)
        tmp.rename(final)
        own = [p for p in list_checkpoints(output_dir) if read_meta(p).get("run_id") == run_id]
        for old in own[: max(0, len(own) - keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(
    path: Path,
    *,
    dist_info: DistInfo,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ds_engine: Any = None,
) -> tuple[int, dict[str, Any]]:
    """Restore model, optimizer, scheduler and RNG from `path`; returns (step, this rank's state)."""
    meta = broadcast_object(read_meta(path) if dist_info.is_main else None)
    if meta["world_size"] != dist_info.world_size:
        raise ValueError(
            f"{path} was written by {meta['world_size']} ranks, this run has {dist_info.world_size}: "
            "resume with the same number of processes (the data position is per rank)"
        )
    if meta["deepspeed"] != (ds_engine is not None):
        kind = "DeepSpeed" if meta["deepspeed"] else "plain"
        raise ValueError(f"{path} is a {kind} checkpoint: resume with the same train.deepspeed setting")
    if ds_engine is not None:
        ds_engine.load_checkpoint(
            str(path),
            tag="ds",
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
    else:
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank_state = torch.load(path / f"rank-{dist_info.rank:05d}.pt", weights_only=True)
    set_rng_state(rank_state.pop("rng"))
    logger.info("resumed from %s (step %d)", path, meta["step"])
    return meta["step"], rank_state
