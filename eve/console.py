"""Console logging for every entry point (training, curation, chat, evaluation): one idiom.

Modules log through `logger = logging.getLogger(__name__)` and never print; an entry point calls
`setup_logging()` once. On rank 0 of a job the console shows INFO and up; on the other ranks only
warnings and errors, prefixed with the rank, so that a problem on any rank is still seen.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def process_rank() -> int:
    """This process's global rank as the launchers (torchrun, deepspeed) export it; 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


class _ConsoleHandler(logging.StreamHandler):
    """The entry points' stderr handler (a type of its own, so that it is added only once)."""


def setup_logging(rank: int | None = None) -> None:
    """One stderr handler with timestamps: INFO on rank 0, WARNING with a rank prefix elsewhere."""
    rank = process_rank() if rank is None else rank
    root = logging.getLogger()
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        handler = _ConsoleHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT if rank == 0 else f"[rank {rank}] {LOG_FORMAT}"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
