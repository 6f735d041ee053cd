"""Step 8, report: counts per drop reason, timings, cluster-size histogram and montages (report/)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter, defaultdict

import numpy as np

from eve.config_loader import config_to_dict

from .captions import CAPTION_DROP_REASONS, load_captions
from .common import decode_image, get_rank, read_jsonl, record_timing, write_json_atomic
from .config import CurationConfig, step_main
from .filter import DROP_REASONS, load_filter
from .selection import load_cluster
from .sources import load_scan

logger = logging.getLogger(__name__)


def gather_counts(cfg: CurationConfig) -> dict:
    """Images at each stage and dropped per reason, from the files the steps wrote."""
    shards = load_scan(cfg)
    filt = [r for rows in load_filter(cfg, len(shards)) for r in rows]
    status = Counter(r["status"] for r in filt)
    labels, _, _ = load_cluster(cfg)
    caps = load_captions(cfg)
    cap_status = Counter(r["status"] for r in caps)
    written = len(read_jsonl(cfg.out / "shards" / "manifest.jsonl"))
    counts = {"scanned": len(filt)}
    counts.update({f"dropped_{k}": status.get(k, 0) for k in DROP_REASONS})
    counts["converted_mode"] = sum(1 for r in filt if r["status"] == "ok" and r.get("converted"))
    counts["clustered"] = len(labels)
    counts["dropped_not_selected"] = len(labels) - len(caps)
    counts["selected"] = len(caps)
    counts.update({f"dropped_{k}": cap_status.get(k, 0) for k in CAPTION_DROP_REASONS})
    counts["written"] = written
    counts["by_source"] = dict(
        Counter(r["source"] for r in read_jsonl(cfg.out / "shards" / "manifest.jsonl"))
    )
    return counts


def gather_timings(cfg: CurationConfig) -> dict[str, float]:
    """Wall seconds per step (the slowest rank for steps that every rank runs)."""
    per: dict[str, float] = defaultdict(float)
    for p in sorted((cfg.out / "report" / "timings").glob("*.json")):
        t = json.loads(p.read_text())
        per[t["step"]] = max(per[t["step"]], t["seconds"])
    return dict(per)


def plot_cluster_sizes(sizes: np.ndarray, n: int, path) -> None:
    """Histogram of cluster sizes with the selection cap n marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(sizes, bins=min(50, max(5, len(sizes) // 2)), color="#4477aa")
    ax.axvline(n, color="#cc3311", ls="--", label=f"n = {n} kept per cluster")
    ax.set_xlabel("images in cluster")
    ax.set_ylabel("clusters")
    ax.set_title(f"{len(sizes)} clusters, {int(sizes.sum())} images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def montage(cfg: CurationConfig, path, n_clusters: int = 6, per_cluster: int = 8, thumb: int = 96) -> None:
    """A grid: one row per cluster (the largest ones), its images nearest the centre first."""
    from PIL import Image

    rows = [r for r in load_captions(cfg) if r["status"] == "ok"]
    by_cluster: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_cluster[r["cluster"]].append(r)
    clusters = sorted(by_cluster, key=lambda c: (-len(by_cluster[c]), c))[:n_clusters]
    by_key = {r.key: r for s in load_scan(cfg) for r in s}
    canvas = Image.new("RGB", (per_cluster * thumb, max(1, len(clusters)) * thumb), "white")
    for y, c in enumerate(clusters):
        for x, r in enumerate(sorted(by_cluster[c], key=lambda r: r["distance"])[:per_cluster]):
            rec = by_key[r["key"]]
            img = decode_image(rec.read_bytes(), rec.where())[0]
            img.thumbnail((thumb, thumb))
            canvas.paste(img, (x * thumb + (thumb - img.width) // 2, y * thumb + (thumb - img.height) // 2))
    canvas.save(path)


def format_table(counts: dict, timings: dict[str, float]) -> str:
    """The report as an aligned text table."""
    lines = ["count                            images", "-" * 40]
    lines += [f"{k:<30} {v:>9}" for k, v in counts.items() if not isinstance(v, dict)]
    lines += [f"  written from {k:<17} {v:>9}" for k, v in counts["by_source"].items()]
    lines += ["", "step                             seconds", "-" * 40]
    lines += [f"{k:<30} {v:>9.2f}" for k, v in timings.items()]
    return "\n".join(lines)


def run(cfg: CurationConfig) -> dict:
    """Write report/report.json, cluster_sizes.png and montage.png; log the table (rank 0)."""
    if get_rank()[0] != 0:
        return {}
    t0 = time.time()
    out = cfg.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    counts = gather_counts(cfg)
    labels, _, stats = load_cluster(cfg)
    sizes = np.bincount(labels, minlength=stats["k"])
    plot_cluster_sizes(sizes, cfg.select.per_cluster, out / "cluster_sizes.png")
    montage(cfg, out / "montage.png")
    blind = cfg.out / "blind_pairs" / "_SUCCESS.json"
    if blind.exists():  # the optional blind_pairs step ran: its montage and counts join the report
        shutil.copyfile(cfg.out / "blind_pairs" / "montage.png", out / "blind_pairs.png")
    record_timing(cfg.out, "report", time.time() - t0)
    timings = gather_timings(cfg)
    report = {
        "counts": counts,
        "timings_s": timings,
        "cluster": {
            **stats,
            "size_min": int(sizes.min()),
            "size_max": int(sizes.max()),
            "size_median": float(np.median(sizes)),
        },
        "config": config_to_dict(cfg),
    }
    if blind.exists():
        report["blind_pairs"] = json.loads(blind.read_text())
    write_json_atomic(out / "report.json", report)
    logger.info("curation report (%s):\n%s", out / "report.json", format_table(counts, timings))
    return report


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.report --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
