"""Curation benchmarks: the pipeline's images/s per step, K-means backends, the features path.

`python bench/bench_curation.py [--only pipeline,kmeans,features] [--n 50000 --dim 256 --k 256 --iters 10 --images 1024]`

1. Pipeline: `configs/curation/embedded.yaml` end to end into a temporary folder (one rank):
   images/s of every step (the images it handles: scanned for scan and filter, which decodes each
   once and embeds it; kept for embed, blind_pairs, cluster and select; selected for captions;
   written for shard and report) and of the whole pipeline (scanned images / wall time).
2. K-means: the same features, the same initial centroids, the same number of Lloyd iterations
   (no subsampling): wall time and objective (mean squared distance to the nearest centre).
3. Features: images/s through the full path (file read + decode + resize in DataLoader workers +
   model) vs the model's forward alone on a ready batch; the loader must not be the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("bench_curation")


# The images each step handles, by the report's count of them.
STEP_IMAGES = {
    "scan": "scanned", "filter": "scanned", "embed": "clustered", "blind_pairs": "clustered",
    "cluster": "clustered", "select": "clustered", "captions": "selected", "shard": "written",
    "report": "written",
}  # fmt: skip


def bench_pipeline(config: str) -> None:
    """Curate the embedded default into a temporary folder; log images/s per step and overall."""
    from data_curation.config import load_config
    from data_curation.embedded import build
    from data_curation.run import STEPS, run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [("embedded.dir", f"{tmp}/data"), ("out_dir", f"{tmp}/curated"),
                                   ("sources.0.path", f"{tmp}/data/sources.jsonl")])  # fmt: skip
        t0 = time.perf_counter()
        build(cfg.embedded, cfg.seed)  # the sources (links + captions), not part of the curation proper
        t1 = time.perf_counter()
        cfg.embedded.enabled = False  # built above
        run(cfg)
        wall = time.perf_counter() - t1
        report = json.loads((cfg.out / "report" / "report.json").read_text())
    counts, seconds = report["counts"], report["timings_s"]
    logger.info(
        "pipeline %s, %d torch threads (sources built in %.1f s):", config, torch.get_num_threads(), t1 - t0
    )
    logger.info("  %-12s %8s %8s %10s", "step", "images", "seconds", "images/s")
    for name, _ in STEPS:
        if name in seconds:
            n = counts[STEP_IMAGES[name]]
            logger.info("  %-12s %8d %8.2f %10.0f", name, n, seconds[name], n / max(seconds[name], 1e-9))
    logger.info("  %-12s %8d %8.2f %10.0f", "pipeline", counts["scanned"], wall, counts["scanned"] / wall)


def bench_kmeans(n: int, dim: int, k: int, iters: int, seed: int = 0) -> None:
    """Time FAISS and sklearn Lloyd from the same start on the same clustered features."""
    from data_curation.cluster import assign, kmeans

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    x = centres[rng.integers(0, k, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)  # (n, dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # like the pipeline's L2-normalised features
    init = x[rng.choice(n, k, replace=False)]
    for backend in ("faiss", "sklearn"):
        t0 = time.perf_counter()
        c = kmeans(x, k, iters, seed, max_points_per_centroid=0, backend=backend, init=init)
        dt = time.perf_counter() - t0
        _, d = assign(x, c)
        logger.info(
            "kmeans %-7s n=%d d=%d k=%d iters=%d: %6.2f s, objective %.5f",
            backend,
            n,
            dim,
            k,
            iters,
            dt,
            float((d.astype(np.float64) ** 2).mean()),
        )


def bench_features(n_images: int, batch_size: int, size: int, workers: int) -> None:
    """Images/s of the embed step's loader + model vs the model's forward on a ready batch."""
    from PIL import Image
    from torch.utils.data import DataLoader

    from data_curation.common import Record
    from data_curation.config import EmbedConfig
    from data_curation.embed import ImageDataset, _worker_init, build_extractor
    from eve.assets import easy_vqa_dir

    ecfg = EmbedConfig(
        backend="timm", model="efficientnet_lite0", weights="asset:efficientnet_lite0", image_size=size
    )
    ext, size = build_extractor(ecfg, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        # Real easy-vqa PNGs re-saved as 256 px JPEGs, so decode and resize cost like photos do.
        src = sorted((easy_vqa_dir("train") / "images").glob("*.png"))[:n_images]
        recs = []
        for i, p in enumerate(src):
            q = Path(tmp) / f"{i}.jpg"
            Image.open(p).convert("RGB").resize((256, 256)).save(q, quality=90)
            recs.append(Record(key=str(i), source="bench", path=str(q)))
        batch = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
        ext(batch)  # warm-up
        t0 = time.perf_counter()
        reps = max(1, n_images // batch_size)
        for _ in range(reps):
            ext(batch)
        bare = reps * batch_size / (time.perf_counter() - t0)
        loader = DataLoader(
            ImageDataset(recs, size), batch_size=batch_size, num_workers=workers, worker_init_fn=_worker_init
        )
        t0 = time.perf_counter()
        n = 0
        for images, _ in loader:
            ext(images)
            n += len(images)
        full = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        m = sum(len(images) for images, _ in loader)
        load_only = m / (time.perf_counter() - t0)
    logger.info(
        "features efficientnet_lite0 %d px bf16, batch %d, %d workers, %d threads: bare forward %.0f img/s, "
        "loader alone %.0f img/s, full loader+model %.0f img/s (%.0f%% of bare)",
        size, batch_size, workers, torch.get_num_threads(), bare, load_only, full, 100 * full / bare,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the chosen benchmarks and log the figures."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default="pipeline,kmeans,features", help="benchmarks to run, comma-separated"
    )
    parser.add_argument("--config", default="configs/curation/embedded.yaml", help="pipeline config")
    parser.add_argument("--n", type=int, default=50000, help="K-means points")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension")
    parser.add_argument("--k", type=int, default=256, help="clusters")
    parser.add_argument("--iters", type=int, default=10, help="Lloyd iterations")
    parser.add_argument("--images", type=int, default=1024, help="images for the feature benchmark")
    parser.add_argument("--size", type=int, default=128, help="model input size (px)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if "pipeline" in only:
        bench_pipeline(args.config)
    if "kmeans" in only:
        bench_kmeans(args.n, args.dim, args.k, args.iters)
    if "features" in only:
        bench_features(args.images, args.batch_size, args.size, args.workers)


if __name__ == "__main__":
    main()
