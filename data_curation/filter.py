"""Step 2, filter: one decode per image. Decode check, resolution filter and content hash per input
shard, and the embedder's features of the images that pass, computed from the same decode; then
exact dedup (over all shards, after every rank is done).

Each image is read and decoded once, here: the decode that checks an image also gives the embed
model its input, so the features of every image that passes the checks are computed in the same
pass and cached as `filter/features-00000.npy` (fp16, one row per passing image, in row order). The
embed step then keeps the rows that are not duplicates; nothing after it decodes the kept images
for the features again. Memory: one batch of embedder inputs (batch_size x 3 x S x S uint8) per
loader worker; disk: the fp16 features of every passing image, duplicates included.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .common import (
    ImageDecodeError,
    Record,
    check_meta,
    decode_image,
    get_rank,
    my_shards,
    read_jsonl,
    record_timing,
    save_npy_atomic,
    square_crop,
    wait_for_files,
    write_jsonl_atomic,
)
from .config import CurationConfig, step_main
from .sources import load_scan

logger = logging.getLogger(__name__)

# Drop reasons, in pipeline order (the report prints them in this order).
DROP_REASONS = ("missing", "decode_error", "too_small", "duplicate")

# Test hook: SIGKILL this process after this many shards are cached (a real, unclean interruption).
KILL_AFTER_ENV = "EVE_CURATION_KILL_AFTER_SHARDS"


def check_image(rec: Record, min_side: int, size: int | None = None) -> tuple[dict, torch.Tensor | None]:
    """Read and decode one image once and check it: (row {key, status, width, height, format, mode,
    converted, sha1}, the embed model's uint8 input (3, size, size) when `size` is given and the image
    passes, else None). JPEGs are DCT-scaled towards `size`, as the embed model's input always was."""
    row: dict = {"key": rec.key}
    try:
        data = rec.read_bytes()
    except OSError as e:
        logger.warning("%s: cannot read (%s); skipped", rec.where(), e)
        return {**row, "status": "missing"}, None
    try:
        img = decode_image(data, rec.where(), draft_size=size)
    except ImageDecodeError as e:
        logger.warning("%s", e)
        return {**row, "status": "decode_error"}, None
    w, h = img.size  # full resolution, also when the JPEG was decoded smaller
    row.update(
        width=w,
        height=h,
        format=img.format,
        mode=img.mode,
        converted=img.converted,
        sha1=hashlib.sha1(data).hexdigest(),
    )
    row["status"] = "ok" if min(w, h) > min_side else "too_small"
    if not size or row["status"] != "ok":
        return row, None
    return row, torch.from_numpy(square_crop(img.image, size))


class CheckedImages(Dataset):
    """Records -> (filter row, embed input (3, S, S) uint8 or None), one read and one decode each."""

    def __init__(self, records: list[Record], min_side: int, size: int):
        self.records, self.min_side, self.size = records, min_side, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[dict, torch.Tensor | None]:
        return check_image(self.records[i], self.min_side, self.size)


def _collate(items: list[tuple[dict, torch.Tensor | None]]) -> tuple[list[dict], torch.Tensor | None]:
    """(rows, inputs of the passing images stacked (n, 3, S, S) or None)."""
    squares = [s for _, s in items if s is not None]
    return [r for r, _ in items], torch.stack(squares) if squares else None


def filter_path(out: Path, i: int) -> Path:
    """The filter rows of input shard i (written last: marks the shard done)."""
    return out / "filter" / f"shard-{i:05d}.jsonl"


def passed_features_path(out: Path, i: int) -> Path:
    """Features (N, D) fp16 of the images of input shard i that passed the checks, in row order."""
    return out / "filter" / f"features-{i:05d}.npy"


def check_features_meta(cfg: CurationConfig) -> None:
    """Refuse to mix features of different extractors in one output folder."""
    meta = {k: getattr(cfg.embed, k) for k in ("backend", "model", "weights", "image_size")}
    fix = "use a new out_dir or delete its filter/ and embed/ folders (and later steps)"
    check_meta(cfg.out / "filter" / "meta.json", meta, "cached features", fix)


def filter_shards(cfg: CurationConfig, shards: list[list[Record]], todo: list[int]) -> Counter:
    """Check and embed the images of input shards `todo` in one decode pass; cache each shard."""
    from .embed import _worker_init, build_extractor, pick_device

    device = pick_device(cfg.embed.device)
    ext, size = build_extractor(cfg.embed, device)
    dim = int(ext(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)).shape[-1])
    bs = cfg.embed.batch_size
    records, batches, owner = [], [], []
    for i in todo:  # loader batches never cross input shards (none is empty), so neither do model batches
        start = len(records)
        records += shards[i]
        batches += [list(range(j, min(j + bs, len(records)))) for j in range(start, len(records), bs)]
        owner += [i] * (len(batches) - len(owner))
    loader = DataLoader(
        CheckedImages(records, cfg.filter.min_side, size),
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=cfg.filter.num_workers,
        worker_init_fn=_worker_init,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    counts: Counter = Counter()
    kill_after, done = int(os.environ.get(KILL_AFTER_ENV, "0")), 0
    bar = tqdm(total=len(records), desc=f"filter r{get_rank()[0]}", unit="img")
    rows: list[dict] = []
    pending = torch.zeros(0, 3, size, size, dtype=torch.uint8)  # passing images not embedded yet
    feats: list[np.ndarray] = []

    def embed(whole_batches_only: bool) -> None:
        """Run the model on the pending images in batches of bs (the last one shorter unless whole_batches_only)."""
        nonlocal pending
        n = len(pending) - len(pending) % bs if whole_batches_only else len(pending)
        for a in range(0, n, bs):
            f = ext(pending[a : a + bs].to(device, non_blocking=True))  # (B, D) float32, L2-normalised
            feats.append(f.cpu().numpy().astype(np.float16))  # fp16 on disk: ample for K-means
        pending = pending[n:]

    def finish(i: int) -> None:
        """Embed the shard's last passing images, cache its features, then its rows (which mark it done)."""
        nonlocal rows, feats, done
        embed(whole_batches_only=False)
        f = np.concatenate(feats) if feats else np.zeros((0, dim), np.float16)
        assert len(f) == sum(r["status"] == "ok" for r in rows), (
            f"shard {i}: one feature row per passing image"
        )
        save_npy_atomic(passed_features_path(cfg.out, i), f)
        write_jsonl_atomic(filter_path(cfg.out, i), rows)
        counts.update(r["status"] for r in rows)
        rows, feats, done = [], [], done + 1
        if kill_after and done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    for b, (batch_rows, squares) in enumerate(loader):
        if b and owner[b] != owner[b - 1]:
            finish(owner[b - 1])
        rows += batch_rows
        if squares is not None:
            pending = torch.cat([pending, squares])  # at most 2 bs images
        embed(whole_batches_only=True)  # a shard's model batches: bs passing images, as if embedded apart
        bar.update(len(batch_rows))
    if owner:
        finish(owner[-1])
    bar.close()
    return counts


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
    """Filter and embed this rank's input shards (shards already done are skipped)."""
    t0 = time.time()
    shards = load_scan(cfg)
    check_features_meta(cfg)
    todo = [i for i in my_shards(len(shards)) if not filter_path(cfg.out, i).exists()]
    counts = filter_shards(cfg, shards, todo) if todo else Counter()
    dt = time.time() - t0
    n = counts.total()
    if todo:
        logger.info(
            "filter: %d shards, %s, %.1f s (%.0f img/s)", len(todo), dict(counts), dt, n / max(dt, 1e-9)
        )
    record_timing(cfg.out, "filter", dt, shards=len(todo), images=n)


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.filter --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
