"""Step 5, select: the n images nearest each centre among its members (smaller clusters give all)."""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from .common import get_rank, record_timing, save_npy_atomic, wait_for_files, write_json_atomic
from .config import CurationConfig, step_main

logger = logging.getLogger(__name__)


def select_nearest(labels: np.ndarray, distances: np.ndarray, n: int) -> np.ndarray:
    """Row ids of the n rows nearest their centre in every cluster, ordered by (cluster, distance, row).

    Each row belongs to exactly one cluster (its nearest centre), so no row is selected twice; a
    cluster with fewer than n members gives all of them. Ties in distance go to the lower row id.
    """
    order = np.lexsort(
        (np.arange(len(labels)), distances, labels)
    )  # sort by cluster, then distance, then row
    sorted_labels = labels[order]
    # Rank of each sorted row inside its cluster: position minus the cluster's first position.
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_cluster = np.arange(len(order)) - starts
    return order[rank_in_cluster < n]


def load_cluster(cfg: CurationConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(labels, distances, stats) written by the cluster step."""
    out = cfg.out / "cluster"
    wait_for_files([out / "_SUCCESS.json"], cfg.barrier_timeout_s, "the cluster step")
    return (
        np.load(out / "labels.npy"),
        np.load(out / "distances.npy"),
        json.loads((out / "_SUCCESS.json").read_text()),
    )


def run(cfg: CurationConfig) -> None:
    """Select the nearest images per centre (rank 0)."""
    out = cfg.out / "select"
    if get_rank()[0] != 0 or (out / "_SUCCESS.json").exists():
        return
    t0 = time.time()
    labels, dist, stats = load_cluster(cfg)
    rows = select_nearest(labels, dist, cfg.select.per_cluster)
    save_npy_atomic(out / "selected.npy", rows)
    sizes = np.bincount(labels, minlength=stats["k"])
    write_json_atomic(
        out / "_SUCCESS.json",
        {
            "selected": len(rows),
            "candidates": len(labels),
            "per_cluster": cfg.select.per_cluster,
            "clusters_smaller_than_n": int((sizes < cfg.select.per_cluster).sum()),
        },
    )
    logger.info("select: %d of %d images (n=%d per cluster)", len(rows), len(labels), cfg.select.per_cluster)
    record_timing(cfg.out, "select", time.time() - t0, images=len(rows))


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.selection --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
