"""Step 4, cluster: seeded K-means (FAISS, on GPU when FAISS sees one) and nearest-centre assignment."""

from __future__ import annotations

import logging
import time

import numpy as np

from .common import get_rank, record_timing, save_npy_atomic, write_json_atomic
from .config import CurationConfig, step_main
from .embed import load_features
from .sources import load_scan

logger = logging.getLogger(__name__)


def have_faiss() -> bool:
    """Whether FAISS imports."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def kmeans(
    x: np.ndarray,
    k: int,
    iterations: int,
    seed: int,
    max_points_per_centroid: int = 256,
    backend: str = "auto",
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Lloyd K-means of x (N, D) float32 -> centroids (k, D) float32; `init` (k, D) fixes the start."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if backend == "auto":
        backend = "faiss" if have_faiss() else "sklearn"
        if backend == "sklearn":
            logger.warning(
                "cluster: faiss is missing, falling back to scikit-learn (slow at scale): pip install faiss-cpu"
            )
    if backend == "faiss":
        import faiss

        mppc = max_points_per_centroid if max_points_per_centroid > 0 else n
        km = faiss.Kmeans(
            d, k, niter=iterations, seed=seed, max_points_per_centroid=mppc, min_points_per_centroid=1,
            gpu=faiss.get_num_gpus() > 0, verbose=False, spherical=False,
        )  # fmt: skip
        km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
        return np.asarray(km.centroids, dtype=np.float32)
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        if max_points_per_centroid > 0 and n > k * max_points_per_centroid:
            x = x[np.random.default_rng(seed).choice(n, k * max_points_per_centroid, replace=False)]
        km = KMeans(
            n_clusters=k, init="random" if init is None else init, n_init=1, max_iter=iterations, tol=0.0,
            random_state=seed, algorithm="lloyd",
        )  # fmt: skip
        km.fit(x)
        return km.cluster_centers_.astype(np.float32)
    raise ValueError(f"cluster.backend {backend!r} is not one of auto, faiss, sklearn")


def assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of every row: (labels (N,) int64, Euclidean distances (N,) float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    labels = np.empty(len(x), np.int64)
    dist2 = np.empty(len(x), np.float32)
    if have_faiss():
        import faiss

        index = faiss.IndexFlatL2(c.shape[1])
        if faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(c)
        for a in range(0, len(x), chunk):
            dd, ii = index.search(x[a : a + chunk], 1)  # (n, 1) squared L2, (n, 1) ids
            dist2[a : a + chunk], labels[a : a + chunk] = dd[:, 0], ii[:, 0]
    else:
        cn = (c.astype(np.float64) ** 2).sum(1)
        for a in range(0, len(x), chunk):
            xb = x[a : a + chunk].astype(np.float64)
            d2 = (xb**2).sum(1, keepdims=True) - 2 * xb @ c.T.astype(np.float64) + cn  # (n, k)
            labels[a : a + chunk] = d2.argmin(1)
            dist2[a : a + chunk] = d2[np.arange(len(xb)), labels[a : a + chunk]]
    return labels, np.sqrt(np.maximum(dist2, 0.0))  # clip the tiny negatives of ||x||^2 - 2xc + ||c||^2


def run(cfg: CurationConfig) -> None:
    """Cluster all features and assign every image to its nearest centre (rank 0)."""
    out = cfg.out / "cluster"
    if get_rank()[0] != 0 or (out / "_SUCCESS.json").exists():
        return
    t0 = time.time()
    n_shards = len(load_scan(cfg))
    keys, x = load_features(cfg, n_shards)
    k = min(cfg.cluster.k, len(x))
    if k < cfg.cluster.k:
        logger.warning("cluster: only %d images for k=%d clusters; using k=%d", len(x), cfg.cluster.k, k)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    centroids = kmeans(
        x,
        k,
        cfg.cluster.iterations,
        cfg.cluster.seed or cfg.seed,
        cfg.cluster.max_points_per_centroid,
        cfg.cluster.backend,
    )
    t_train = time.time() - t0
    labels, dist = assign(x, centroids)
    objective = float((dist.astype(np.float64) ** 2).mean())
    save_npy_atomic(out / "centroids.npy", centroids)
    save_npy_atomic(out / "labels.npy", labels)
    save_npy_atomic(out / "distances.npy", dist)
    sizes = np.bincount(labels, minlength=k)
    stats = {
        "n": len(x),
        "k": k,
        "dim": int(x.shape[1]),
        "objective_mean_sq_dist": objective,
        "empty_clusters": int((sizes == 0).sum()),
        "train_s": t_train,
    }
    write_json_atomic(out / "_SUCCESS.json", stats)
    logger.info(
        "cluster: %d images -> %d clusters in %.1f s (mean sq. distance %.4f)",
        len(x),
        k,
        time.time() - t0,
        objective,
    )
    record_timing(cfg.out, "cluster", time.time() - t0, images=len(x))


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.cluster --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
