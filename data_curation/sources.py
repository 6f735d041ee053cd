"""Step 1, scan: list every source image into input shards `scan/inputs-00000.jsonl` (rank 0 only)."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import tarfile
import time
from pathlib import Path

from eve.image_processing_eve import IMAGE_EXTENSIONS

from .common import (
    NothingKeptError,
    Record,
    get_rank,
    read_jsonl,
    record_timing,
    wait_for_files,
    write_json_atomic,
    write_jsonl_atomic,
)
from .config import CurationConfig, SourceConfig, step_main

logger = logging.getLogger(__name__)


def _name(src: SourceConfig) -> str:
    """The source's name (its config name, else the last component of its path)."""
    return src.name or Path(src.path.rstrip("/")).stem or "source"


def scan_folder(src: SourceConfig) -> list[Record]:
    """Images under a folder (recursive, sorted); a sibling `name.txt` is the caption."""
    root = Path(src.path)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {root} does not exist; fix sources[].path in the config")
    name = _name(src)
    out = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        txt = p.with_suffix(".txt")
        caption = txt.read_text().strip() if txt.is_file() else None
        out.append(
            Record(
                key=f"{name}/{p.relative_to(root).with_suffix('').as_posix()}",
                source=name,
                path=str(p),
                caption=caption,
            )
        )
    return out


def _tar_files(path: str) -> list[str]:
    """The tar files a `wds` source names: a file, a folder of *.tar, or a glob."""
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.tar"))
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(f"webdataset source {path}: no .tar files found; fix sources[].path")
    return files


def scan_tar(tar_path: str, src: SourceConfig) -> list[Record]:
    """Samples of one webdataset tar: image member offsets (for random access) and captions."""
    name = _name(src)
    images: dict[str, tuple[int, int]] = {}
    captions: dict[str, str] = {}
    order: list[str] = []
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)
            # webdataset convention: the key is everything before the first dot of the file name.
            stem, _, ext = base[-1].partition(".")
            key = (base[0] + "/" + stem) if len(base) == 2 else stem
            ext = ext.lower()
            if "." + ext in IMAGE_EXTENSIONS and key not in images:
                images[key] = (m.offset_data, m.size)
                order.append(key)
            elif ext == src.caption_key:
                raw = tf.extractfile(m).read().decode("utf-8", errors="replace")
                if ext == "json":
                    try:
                        raw = json.loads(raw).get("caption") or ""
                    except (json.JSONDecodeError, AttributeError):
                        logger.warning(
                            "%s: member %s is not a JSON object; caption ignored", tar_path, m.name
                        )
                        raw = ""
                captions[key] = raw.strip()
    stem = Path(tar_path).stem
    return [
        Record(
            key=f"{name}/{stem}/{k}",
            source=name,
            path=tar_path,
            offset=images[k][0],
            size=images[k][1],
            caption=captions.get(k) or None,
        )
        for k in order
    ]


def scan_jsonl(src: SourceConfig) -> list[Record]:
    """Images listed in a JSONL file: `{"image": path, "caption"?: str, "source"?: str}` per line."""
    p = Path(src.path)
    if not p.is_file():
        raise FileNotFoundError(f"source list {p} does not exist; fix sources[].path in the config")
    out = []
    for i, row in enumerate(read_jsonl(p)):
        if "image" not in row:
            raise ValueError(
                f'{p} line {i + 1}: no \'image\' field; each line needs {{"image": path, "caption": ...}}'
            )
        img = Path(row["image"])
        img = img if img.is_absolute() else p.parent / img
        source = row.get("source") or _name(src)
        out.append(
            Record(
                key=f"{source}/{Path(row['image']).with_suffix('').as_posix().lstrip('/')}",
                source=source,
                path=str(img),
                caption=row.get("caption"),
            )
        )
    return out


def scan_sources(cfg: CurationConfig) -> list[list[Record]]:
    """All sources cut into input shards (folder and JSONL sources by scan.shard_size; one per tar)."""
    shards: list[list[Record]] = []
    for src in cfg.sources:
        if src.type == "wds":
            shards += [scan_tar(t, src) for t in _tar_files(src.path)]
            continue
        if src.type == "folder":
            recs = scan_folder(src)
        elif src.type == "jsonl":
            recs = scan_jsonl(src)
        else:
            raise ValueError(f"sources[].type {src.type!r} is not one of folder, wds, jsonl")
        size = cfg.scan.shard_size
        shards += [recs[i : i + size] for i in range(0, len(recs), size)]
    if cfg.scan.max_images is not None:
        left, kept = cfg.scan.max_images, []
        for shard in shards:
            kept.append(shard[: max(left, 0)])
            left -= len(kept[-1])
        shards = kept
    # Keys must be unique (caches and the manifest are keyed by them): number any repeats.
    seen: dict[str, int] = {}
    for shard in shards:
        for r in shard:
            n = seen.get(r.key, 0)
            seen[r.key] = n + 1
            if n:
                r.key = f"{r.key}#{n}"
    return [s for s in shards if s]


def shard_path(out: Path, i: int) -> Path:
    """The scan output of input shard i."""
    return out / "scan" / f"inputs-{i:05d}.jsonl"


def load_scan(cfg: CurationConfig) -> list[list[Record]]:
    """Read the input shards written by the scan step (waiting for rank 0 if needed)."""
    done = cfg.out / "scan" / "_SUCCESS.json"
    wait_for_files([done], cfg.barrier_timeout_s, "the scan step of rank 0")
    n = json.loads(done.read_text())["n_shards"]
    return [[Record.from_json(d) for d in read_jsonl(shard_path(cfg.out, i))] for i in range(n)]


def sources_fingerprint(cfg: CurationConfig) -> str:
    """sha256 of the source settings, the scan settings and every JSONL source's bytes.

    A JSONL list carries the captions, so rewriting it (e.g. other caption options) changes the
    fingerprint; folder and tar sources are identified by their settings only.
    """
    h = hashlib.sha256()
    settings = [{**dataclasses.asdict(s), "path": str(Path(s.path).resolve())} for s in cfg.sources]
    h.update(json.dumps(settings, sort_keys=True).encode())  # absolute: `make demo` and `make curate` agree
    h.update(json.dumps(dataclasses.asdict(cfg.scan), sort_keys=True).encode())
    for src in cfg.sources:
        if src.type == "jsonl" and Path(src.path).is_file():
            with open(src.path, "rb") as f:  # in blocks: a LAION-scale list does not fit in memory
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def run(cfg: CurationConfig) -> None:
    """Scan the sources into input shards (rank 0; skipped when already done with the same sources).

    Every later step skips what is on disk, so a finished scan of other sources is an error, not a
    silent reuse of stale shards.
    """
    done = cfg.out / "scan" / "_SUCCESS.json"
    if get_rank()[0] != 0:
        return
    if done.exists():
        before = json.loads(done.read_text()).get("sources_fingerprint")
        if before is not None and before != sources_fingerprint(cfg):
            raise ValueError(
                f"the sources changed since {cfg.out} was curated from them (sources or scan settings, or "
                f"a JSONL list's contents); curate into a new out_dir, or delete {cfg.out} to redo it"
            )
        return
    if not cfg.sources:
        raise ValueError("the config lists no sources; add sources: [{type: folder|wds|jsonl, path: ...}]")
    t0 = time.time()
    shards = scan_sources(cfg)
    if not shards:
        raise NothingKeptError(
            f"curation kept no image: the scan step found no image file ({', '.join(IMAGE_EXTENSIONS)}) "
            f"in the sources {[s.path for s in cfg.sources]}; fix sources[].path (or scan.max_images)"
        )
    for i, recs in enumerate(shards):
        write_jsonl_atomic(shard_path(cfg.out, i), [r.to_json() for r in recs])
    n = sum(len(s) for s in shards)
    write_json_atomic(
        done, {"n_shards": len(shards), "n_records": n, "sources_fingerprint": sources_fingerprint(cfg)}
    )
    logger.info("scan: %d images in %d input shards", n, len(shards))
    record_timing(cfg.out, "scan", time.time() - t0, images=n)


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.sources --config X [overrides]`."""
    step_main(run, argv)


if __name__ == "__main__":
    main()
