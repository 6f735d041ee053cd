"""Step 2, filter: decode check, resolution filter and content hash per input shard; then exact dedup."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .common import (
    ImageDecodeError,
    Record,
    decode_image,
    get_rank,
    my_shards,
    read_jsonl,
    record_timing,
    wait_for_files,
    write_jsonl_atomic,
)
from .config import CurationConfig, step_main
from .sources import load_scan

logger = logging.getLogger(__name__)

# Drop reasons, in pipeline order (the report prints them in this order).
DROP_REASONS = ("missing", "decode_error", "too_small", "duplicate")


def check_image(rec: Record, min_side: int) -> dict:
    """Decode one image fully and check its size: a row {key, status, width, height, format, mode, sha1}."""
    row: dict = {"key": rec.key}
    try:
        data = rec.read_bytes()
    except OSError as e:
        logger.warning("%s: cannot read (%s); skipped", rec.where(), e)
        return {**row, "status": "missing"}
    try:
        img, fmt, mode, converted = decode_image(data, rec.where())
    except ImageDecodeError as e:
        logger.warning("%s", e)
        return {**row, "status": "decode_error"}
    w, h = img.size
    row.update(
        width=w, height=h, format=fmt, mode=mode, converted=converted, sha1=hashlib.sha1(data).hexdigest()
    )
    row["status"] = "ok" if min(w, h) > min_side else "too_small"
    return row


def _check(args: tuple[dict, int]) -> dict:
    """Pool entry point."""
    rec, min_side = args
    return check_image(Record.from_json(rec), min_side)


def filter_path(out: Path, i: int) -> Path:
    """The filter output of input shard i."""
    return out / "filter" / f"shard-{i:05d}.jsonl"


def filter_shard(records: list[Record], min_side: int, num_workers: int, desc: str) -> list[dict]:
    """Check every record of one input shard (in a process pool when num_workers > 0)."""
    jobs = [(r.to_json(), min_side) for r in records]
    if num_workers > 0 and len(jobs) > 1:
        with mp.get_context("fork").Pool(num_workers) as pool:
            rows = list(tqdm(pool.imap(_check, jobs, chunksize=32), total=len(jobs), desc=desc, leave=False))
    else:
        rows = [_check(j) for j in tqdm(jobs, desc=desc, leave=False)]
    return rows


def load_filter(cfg: CurationConfig, n_shards: int) -> list[list[dict]]:
    """Filter rows of every input shard with exact duplicates marked (waits for all ranks)."""
    paths = [filter_path(cfg.out, i) for i in range(n_shards)]
    wait_for_files(paths, cfg.barrier_timeout_s, "the filter step of every rank")
    shards = [read_jsonl(p) for p in paths]
    if cfg.filter.dedup:
        seen: set[str] = set()
        for rows in shards:  # scan order: the first occurrence is kept
            for r in rows:
                if r["status"] != "ok":
                    continue
                if r["sha1"] in seen:
                    r["status"] = "duplicate"
                seen.add(r["sha1"])
    return shards


def run(cfg: CurationConfig) -> None:
    """Filter this rank's input shards (shards already done are skipped)."""
    t0 = time.time()
    shards = load_scan(cfg)
    todo = [i for i in my_shards(len(shards)) if not filter_path(cfg.out, i).exists()]
    counts: Counter = Counter()
    for i in tqdm(todo, desc=f"filter r{get_rank()[0]}", disable=len(todo) < 2):
        rows = filter_shard(shards[i], cfg.filter.min_side, cfg.filter.num_workers, f"filter shard {i}")
        counts.update(r["status"] for r in rows)
        write_jsonl_atomic(filter_path(cfg.out, i), rows)
    if todo:
        logger.info("filter: %d shards, %s", len(todo), dict(counts))
    record_timing(cfg.out, "filter", time.time() - t0, shards=len(todo))


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.filter --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
