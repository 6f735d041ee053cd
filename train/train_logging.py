"""Rank-0 logging: a `logging` logger that is quiet on other ranks, metrics.jsonl, optional TensorBoard.

(Named train_logging so that `python train/sft.py`, which puts train/ first on sys.path, does not
shadow the standard library's `logging`.)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str, rank: int) -> logging.Logger:
    """`name`'s logger: INFO on rank 0, WARNING elsewhere (so every rank still reports problems)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


class _ConsoleHandler(logging.StreamHandler):
    """The entry scripts' stderr handler (a type of its own, so that it is added once)."""


def setup_console_logging(rank: int = 0) -> None:
    """For entry scripts: one stderr handler with timestamps (rank 0 INFO, others WARNING)."""
    root = logging.getLogger()
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        handler = _ConsoleHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT if rank == 0 else f"[rank {rank}] {LOG_FORMAT}"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class MetricsWriter:
    """Appends one JSON object per logged step to output_dir/metrics.jsonl (rank 0 only).

    On resume the file is truncated to the steps before the resumed step, so that it never holds two
    records of one step.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = False, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists() and start_step > 0:
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start_step
            ]
        self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                get_logger(__name__, 0).warning("tensorboard is not installed: logging to metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(Path(output_dir) / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        """Log one step's record (must hold "step")."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of output_dir/metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
