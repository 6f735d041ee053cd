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
from .common import Record, atomic_path, check_kept, decode_image, get_rank, record_timing, write_jsonl_atomic
from .config import CurationConfig, step_main
from .filter import load_filter
from .sources import load_scan

logger = logging.getLogger(__name__)

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
    img, _, _, _ = decode_image(data, rec.where())
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
    """Write the kept samples into shards (rank 0); finished tars are kept, the manifest is written last."""
    out = cfg.out / "shards"
    manifest = out / "manifest.jsonl"
    if get_rank()[0] != 0 or manifest.exists():
        return
    t0 = time.time()
    shards = load_scan(cfg)
    filt = {r["key"]: r for rows in load_filter(cfg, len(shards)) for r in rows}
    by_key = {r.key: r for s in shards for r in s}
    captioned = load_captions(cfg)
    rows = [r for r in captioned if r["status"] == "ok"]
    status = Counter(r["status"] for r in captioned)
    check_kept("captions", len(rows), f"{len(captioned)} selected", status, "see the captions step's log")
    if cfg.shard.shuffle:
        rows = [rows[i] for i in np.random.default_rng(cfg.seed).permutation(len(rows))]
    per = cfg.shard.samples_per_shard
    entries = []
    for s in tqdm(range(0, len(rows), per), desc="shards", disable=len(rows) <= per):
        name = f"shard-{s // per:06d}.tar"
        todo = []
        for j, row in enumerate(rows[s : s + per], start=s):
            rec, f = by_key[row["key"]], filt[row["key"]]
            key = f"{j:09d}"
            meta = {
                "source": rec.source, "source_key": rec.key, "cluster": row["cluster"], "distance": round(row["distance"], 6),
                "width": f["width"], "height": f["height"], "caption_source": row["caption_source"],
            }  # fmt: skip
            ext = payload_ext(f)
            entries.append({"key": key, "shard": name, "ext": ext, "caption": row["caption"], **meta})
            if not (out / name).exists():  # a tar written before an interruption has the same bytes
                todo.append((key, rec, f, ext, row["caption"], meta))
        if todo:  # images are read while the tar is written, not held in memory
            write_shard(out / name, ((k, image_payload(r, f), e, c, m) for k, r, f, e, c, m in todo))
    write_jsonl_atomic(manifest, entries)
    logger.info("shard: %d samples in %d shards under %s", len(entries), (len(rows) + per - 1) // per, out)
    record_timing(cfg.out, "shard", time.time() - t0, images=len(entries))


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.shard --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
