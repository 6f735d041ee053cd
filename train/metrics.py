"""Training metrics: metrics.jsonl (one JSON object per logged step, rank 0) and optional TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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
                logger.warning("tensorboard is not installed: logging to metrics.jsonl only")
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


def mean_tokens_per_s(rows: list[dict[str, Any]]) -> float | None:
    """Mean training tokens/s of a stage's records, its first (warm-up) step left out; None if none."""
    values = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s") is not None]
    return sum(values) / len(values) if values else None
