"""Shared plumbing of the curation steps: ranks, atomic writes, file barriers, records, image decoding."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

logger = logging.getLogger(__name__)


def get_rank() -> tuple[int, int]:
    """(rank, world size) from the torchrun / deepspeed environment (RANK, WORLD_SIZE); (0, 1) alone."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world}); fix the launcher environment")
    return rank, world


def my_shards(n_shards: int) -> list[int]:
    """Input shards owned by this rank: shard i belongs to rank i % world size."""
    rank, world = get_rank()
    return [i for i in range(n_shards) if i % world == rank]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path` (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file through a temporary name."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write a JSON file through a temporary name."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write a JSONL file (one object per line) through a temporary name."""
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """np.save through a temporary name."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for_files(paths: list[Path], timeout_s: float, what: str) -> None:
    """File-based barrier: wait until every path exists (written by other ranks), else fail loudly."""
    start, delay = time.time(), 0.05
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            return
        if time.time() - start > timeout_s:
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for {what}: {len(missing)} file(s) missing, e.g. {missing[0]}; "
                "a rank probably died: re-run the same command (finished work is kept)"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def record_timing(out: Path, step: str, seconds: float, **extra: object) -> None:
    """Store the wall time of a step on this rank under report/timings/."""
    rank = get_rank()[0]
    write_json_atomic(
        out / "report" / "timings" / f"{step}.rank{rank}.json",
        {"step": step, "seconds": seconds, "rank": rank, **extra},
    )


@dataclass
class Record:
    """One input image: where its bytes are and what the source says about it."""

    key: str
    """Unique id: `{source}/{path inside the source without extension}`."""
    source: str
    """Source name."""
    path: str
    """Image file, or the tar file holding it."""
    offset: int = -1
    """Byte offset of the image inside the tar (-1 for a plain file)."""
    size: int = -1
    """Byte length inside the tar (-1 for a plain file)."""
    caption: str | None = None
    """Caption given by the source, if any."""

    def to_json(self) -> dict:
        """As a JSON-able dict."""
        return {k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict) -> Record:
        """From a dict written by to_json."""
        return cls(**d)

    def read_bytes(self) -> bytes:
        """The image file's bytes (random access into tars through the stored offset)."""
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)

    def where(self) -> str:
        """Human-readable location for error messages."""
        return self.path if self.offset < 0 else f"{self.path} (member of {self.key})"


class NothingKeptError(ValueError):
    """A step dropped every image, so the curation would write no sample; the message names the step,
    its counts by reason and the setting to look at. `python -m data_curation.run` exits with it."""


def check_kept(step: str, kept: int, seen: str, dropped: dict[str, int], fix: str) -> None:
    """Raise NothingKeptError when `step` kept no image; `seen` says what it was given ("12 scanned")."""
    if kept > 0:
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()) if v) or "no reason recorded"
    raise NothingKeptError(
        f"curation kept no image: the {step} step dropped every image ({seen}; {reasons}); {fix}"
    )


class ImageDecodeError(ValueError):
    """An image file cannot be decoded; the message names the file."""


def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """Convert any PIL mode to RGB (16-bit, float, palette, CMYK, alpha); returns (image, converted)."""
    if img.mode == "RGB":
        return img, False
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit greyscale: scale the actual range to 8 bits (PIL has no direct RGB path).
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB"), True
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Alpha over white, as a viewer would show it.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB"), True
    return img.convert("RGB"), True


class Decoded(NamedTuple):
    """A decoded image and what its file says about it."""

    image: Image.Image
    """RGB, EXIF orientation applied; DCT-scaled (smaller) when decoded with a draft size."""
    format: str
    """PIL format name (JPEG, PNG, ...)."""
    mode: str
    """The file's own PIL mode, before the RGB conversion."""
    converted: bool
    """Whether the mode was converted to RGB."""
    size: tuple[int, int]
    """(width, height) at full resolution, EXIF orientation applied, whatever the draft size."""


def decode_image(data: bytes, where: str, draft_size: int | None = None) -> Decoded:
    """Fully decode image bytes to RGB (JPEG DCT-scaled towards `draft_size`). Raises ImageDecodeError."""
    try:
        img = Image.open(io.BytesIO(data))
        fmt, mode = img.format or "UNKNOWN", img.mode
        w, h = img.size  # the header's full resolution, before any DCT scaling
        if draft_size and fmt == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # JPEG DCT scaling: decode large files faster
        img.load()
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # a quarter turn swaps the sides
            w, h = h, w
        img = ImageOps.exif_transpose(img)
        rgb, converted = to_rgb(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ImageDecodeError(
            f"{where}: cannot decode image ({type(e).__name__}: {e}); the file is skipped"
        ) from e
    return Decoded(rgb, fmt, mode, converted, (w, h))


def square_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to `size` (bicubic) and centre-crop: the embed models' input, uint8 (3, size, size)."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1).copy()


def check_meta(path: Path, meta: dict, what: str, fix: str) -> None:
    """Refuse to mix outputs of different settings in one folder: `path` (a meta.json) must hold `meta`
    when it exists; rank 0 writes it otherwise. `what`: what the folder caches; `fix`: the way out."""
    if path.exists():
        old = json.loads(path.read_text())
        if old != meta:
            raise ValueError(f"{path}: {what} come from {old}, the config asks for {meta}; {fix}")
    elif get_rank()[0] == 0:
        write_json_atomic(path, meta)
