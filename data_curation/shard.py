"""Step 7, shard: webdataset tars `shards/shard-000000.tar` ({key}.jpg|png, .txt, .json) + manifest.jsonl."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .captions import load_captions
from .common import (
    Record,
    atomic_path,
    check_kept,
    decode_image,
    get_rank,
    my_shards,
    record_timing,
    wait_for_files,
    write_jsonl_atomic,
)
from .config import CurationConfig, step_main
from .filter import load_filter
from .sources import load_scan

logger = logging.getLogger(__name__)

# A sample's .json metadata: these fields of its manifest entry.
META_KEYS = ("source", "source_key", "cluster", "distance", "width", "height", "caption_source")
# Formats whose bytes go into the shards unchanged (when already RGB or greyscale); others become PNG.
PASSTHROUGH = {"JPEG": "jpg", "PNG": "png"}


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata, so that the same samples give byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
        len(data),
        0,
        0o644,
        0,
        0,
        "",
        "",
    )
    tf.addfile(info, io.BytesIO(data))


def payload_ext(filt: dict) -> str:
    """Extension of a sample's image in the shards: its own for RGB/greyscale JPEG/PNG, else png."""
    if filt["format"] in PASSTHROUGH and filt["mode"] in ("RGB", "L"):
        return PASSTHROUGH[filt["format"]]
    return "png"


def image_payload(rec: Record, filt: dict) -> bytes:
    """A sample's image bytes: the original JPEG/PNG file, or an RGB PNG for other formats and modes."""
    data = rec.read_bytes()
    if filt["format"] in PASSTHROUGH and filt["mode"] in ("RGB", "L"):
        return data
    img = decode_image(data, rec.where()).image
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: Iterable[tuple[str, bytes, str, str, dict]]) -> None:
    """Stream (key, image bytes, ext, caption, meta) samples into one tar through a temporary name."""
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for key, img, ext, caption, meta in samples:
                _add(tf, f"{key}.{ext}", img)
                _add(tf, f"{key}.txt", caption.encode("utf-8"))
                _add(tf, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))


def run(cfg: CurationConfig) -> None:
    """Write the kept samples into shards: output shard s on rank s % world size (finished tars are
    kept); rank 0 waits for every tar and writes the manifest last."""
    out = cfg.out / "shards"
    manifest = out / "manifest.jsonl"
    if manifest.exists():
        return
    t0 = time.time()
    shards = load_scan(cfg)
    filt = {r["key"]: r for rows in load_filter(cfg, len(shards)) for r in rows}
    by_key = {r.key: r for s in shards for r in s}
    captioned = load_captions(cfg)
    rows = [r for r in captioned if r["status"] == "ok"]
    status = Counter(r["status"] for r in captioned)
    check_kept("captions", len(rows), f"{len(captioned)} selected", status, "see the captions step's log")
    if cfg.shard.shuffle:  # every rank draws the same order: the samples' places do not depend on ranks
        rows = [rows[i] for i in np.random.default_rng(cfg.seed).permutation(len(rows))]
    per = cfg.shard.samples_per_shard
    n_out = (len(rows) + per - 1) // per
    names = [f"shard-{s:06d}.tar" for s in range(n_out)]
    entries, written = [], 0
    for j, row in enumerate(rows):  # sample j goes into output shard j // per
        rec, f = by_key[row["key"]], filt[row["key"]]
        entries.append({
            "key": f"{j:09d}", "shard": names[j // per], "ext": payload_ext(f), "caption": row["caption"],
            "source": rec.source, "source_key": rec.key, "cluster": row["cluster"], "distance": round(row["distance"], 6),
            "width": f["width"], "height": f["height"], "caption_source": row["caption_source"],
        })  # fmt: skip
    mine = [s for s in my_shards(n_out) if not (out / names[s]).exists()]  # a finished tar has the same bytes
    for s in tqdm(mine, desc=f"shards r{get_rank()[0]}", disable=len(mine) < 2):
        todo = entries[s * per : (s + 1) * per]
        # Images are read while the tar is written, not held in memory.
        samples = (
            (e["key"], image_payload(by_key[e["source_key"]], filt[e["source_key"]]), e["ext"], e["caption"],
             {k: e[k] for k in META_KEYS})
            for e in todo
        )  # fmt: skip
        write_shard(out / names[s], samples)
        written += len(todo)
    record_timing(cfg.out, "shard", time.time() - t0, images=written)
    if get_rank()[0] != 0:
        return
    wait_for_files([out / n for n in names], cfg.barrier_timeout_s, "the shard step of every rank")
    write_jsonl_atomic(manifest, entries)
    logger.info("shard: %d samples in %d shards under %s", len(entries), n_out, out)


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.shard --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
