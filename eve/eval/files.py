"""What every benchmark reader shares: the sample record, JSON row reading, finding the data file
and resolving image paths (missing images are skipped, counted and reported)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class EvalSample:
    """One benchmark question with its reference answer(s)."""

    id: str
    question: str
    """The benchmark's question text, without any answer-format instruction."""
    answers: list[str]
    """Reference answers; for multiple choice the one correct option letter ("A")."""
    image: Path | None
    category: str = "all"
    choices: list[str] | None = None
    """Option texts in letter order (multiple choice only)."""
    context: str = ""
    """Extra context shown before the question (ScienceQA's hint)."""
    meta: dict = field(default_factory=dict)
    """Benchmark-specific fields used by its metrics (MMVP pair id, CV-Bench source)."""


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSON list, a JSON object of rows, or a JSON-lines file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".parquet":
        raise ValueError(f"{path}: parquet is not read here; use the release's .jsonl file instead")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e}); expected one object per line") from e
        return rows
    if isinstance(data, dict):
        return [data]
    return data


def find_file(root: Path, names: Sequence[str], what: str) -> Path:
    """`root` itself when it is a file, else the first of `names` inside it; error names the fix."""
    if root.is_file():
        return root
    for name in names:
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"{root}: no {what} found (looked for {', '.join(names)}); pass --data to the {what}"
    )


class ImageResolver:
    """Turns a benchmark's relative image path into a file, trying a few roots; counts misses."""

    def __init__(self, roots: Sequence[Path]):
        self.roots = [r for r in roots if r is not None]
        self.missing: list[str] = []

    def __call__(self, rel: str) -> Path | None:
        """The image file for `rel`, or None (recorded) when no root holds it."""
        p = Path(rel)
        for cand in [p] if p.is_absolute() else [r / p for r in self.roots]:
            if cand.is_file():
                return cand
        self.missing.append(rel)
        return None

    def report(self, source: Path, n_total: int) -> None:
        """Log skipped samples; raise when no image was found at all."""
        if not self.missing:
            return
        roots = ", ".join(str(r) for r in self.roots)
        msg = (
            f"{source}: {len(self.missing)} of {n_total} samples skipped, image not found "
            f"(first: {self.missing[0]!r}, looked under {roots}); pass --image-root to the image folder"
        )
        if len(self.missing) == n_total:
            raise FileNotFoundError(msg)
        logger.warning(msg)
