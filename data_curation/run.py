"""Run the whole curation pipeline: `python -m data_curation.run --config configs/curation/embedded.yaml`.

Every step skips work already on disk, so re-running after an interruption continues where it
stopped and gives the same output. Under `torchrun` (RANK / WORLD_SIZE set) every rank filters
(decoding each image once and embedding it) and keeps the features of its own input shards; rank 0
waits for the others' files, then clusters and selects; every rank captions its caption parts and
writes its output tars; rank 0 waits for them, then writes the manifest and the report. The optional
blind_pairs step (CLIP-blind pair mining) runs after embed when `blind_pairs.enabled` is set; every
rank mines its own shards.
"""

from __future__ import annotations

import logging
import time

from eve.console import setup_logging

from . import blind_pairs, captions, cluster, embed, filter, report, selection, shard, sources
from .common import NothingKeptError, get_rank
from .config import CurationConfig, parse_step_args

# The pipeline, in order: (name, step module). Each module also runs alone: python -m data_curation.<module>.
STEPS = (
    ("scan", sources),
    ("filter", filter),
    ("embed", embed),
    ("blind_pairs", blind_pairs),  # optional (blind_pairs.enabled): CLIP-blind pair mining
    ("cluster", cluster),
    ("select", selection),
    ("captions", captions),
    ("shard", shard),
    ("report", report),
)

logger = logging.getLogger(__name__)


def run(cfg: CurationConfig, steps: list[str] | None = None) -> None:
    """Run the named steps (all by default) in pipeline order."""
    known = [name for name, _ in STEPS]
    unknown = set(steps or []) - set(known)
    if unknown:
        raise ValueError(f"unknown step(s) {sorted(unknown)}; steps are {known}")
    t0 = time.time()
    rank, world = get_rank()
    if cfg.embedded.enabled and rank == 0 and (steps is None or "scan" in steps):
        from .embedded import build

        build(cfg.embedded, cfg.seed)
    logger.info("curation into %s (rank %d of %d)", cfg.out, rank, world)
    for name, module in STEPS:
        if steps is None or name in steps:
            module.run(cfg)
    logger.info("curation finished in %.1f s: %s", time.time() - t0, cfg.out / "shards")


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.run --config X [--steps scan,filter] [--section.key value ...]`."""
    setup_logging()
    cfg, flags = parse_step_args(argv, flags=("steps",))
    try:
        run(cfg, flags["steps"].split(",") if "steps" in flags else None)
    except NothingKeptError as e:  # an outcome of the data, not a bug: the message without a traceback
        logger.error("%s", e)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
