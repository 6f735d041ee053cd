"""Raw training records: LLaVA JSON (or JSON lines) entries and webdataset tar members, before decoding.

A record that cannot become a sample carries a `BadSample` (the reason is the counter key); readers
never raise for one bad record, and a truncated or corrupt shard ends early and is counted.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eve.image_processing_eve import IMAGE_EXTENSIONS
from eve.templates import GPT, HUMAN

logger = logging.getLogger(__name__)

IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)  # webdataset member extensions: no dot


class BadSample(Exception):
    """A record that cannot become a training sample; `reason` is the counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Skips:
    """Bad records met since the last report: counts by reason and one line per skipped record."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        """Skipped records by reason (truncated_shard counts shards)."""
        self.lines: list[dict] = []
        """{"source", "reason", "message"} of each skip, in the order met."""

    def add(self, reason: str, source: str, message: str) -> None:
        """Count one skip and remember where it was."""
        self.counts[reason] += 1
        self.lines.append({"source": source, "reason": reason, "message": message})

    def clear(self) -> None:
        """Forget everything (after a report, or for work counted before a resume)."""
        self.counts.clear()
        self.lines.clear()


@dataclass
class Record:
    """One raw record before decoding."""

    source: str
    """Where it came from: 'file.json#index' or 'shard.tar:key' (used in messages)."""
    conversations: list | None = None
    """LLaVA conversations (None for webdataset records, whose caption is in `caption`)."""
    caption: str | None = None
    """Caption of a webdataset record."""
    image_path: str | None = None
    """Resolved image file of a JSON record."""
    image_bytes: bytes | None = None
    """Encoded image of a webdataset record."""
    error: BadSample | None = None
    """Set when the record is already known to be bad (broken JSON, escaping path, ...)."""


def resolve_image(root: Path, rel: Any, source: str) -> Record | None:
    """The image path under root, or None with an error when it escapes the root."""
    if not isinstance(rel, str) or not rel:
        return Record(source, error=BadSample("bad_record", f"{source}: 'image' must be a non-empty string"))
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        return Record(
            source,
            error=BadSample(
                "path_escape",
                f"{source}: image path {rel!r} leaves the image root {root}; use a relative path",
            ),
        )
    # The check is lexical on purpose: a relative path without ".." stays under the root, and
    # symlinks that the user placed inside the root (data farms, the demo's links into
    # site-packages) are legitimate, so they are not resolved.
    return None


def conversation_problem(conversations: list, source: str) -> BadSample | None:
    """A BadSample when the turns are not {'from': 'human'|'gpt', 'value': str} dicts, else None.

    Checked when the record is read, so that a malformed turn is counted as bad_conversation with the
    record's name instead of failing inside the processor; the order of turns is the template's check.
    """
    if not conversations:
        return BadSample("bad_conversation", f"{source}: empty 'conversations' list")
    for i, turn in enumerate(conversations):
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in (HUMAN, GPT)
            or not isinstance(turn.get("value"), str)
        ):
            shown = repr(turn)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            return BadSample(
                "bad_conversation",
                f"{source}: turn {i} must be {{'from': '{HUMAN}' or '{GPT}', 'value': a string}}, got {shown}",
            )
    return None


def load_json_records(path: str, image_root: str | None) -> list[Record]:
    """All records of a LLaVA JSON list or JSON-lines file (broken lines become bad records).

    The one reader of training JSON: the loader and the engine's record count (`train.build`) both
    use it. A file that is not JSON at all (or not UTF-8) is a ValueError naming it and the fix.
    """
    root = Path(image_root) if image_root else Path(path).parent
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); re-encode the file as UTF-8") from e
    entries: list[tuple[str, Any]] = []
    if path.endswith(".jsonl"):
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}#{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                entries.append((f"{path}#{i}", BadSample("broken_json", f"{path} line {i + 1}: {e}")))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not valid JSON ({e}); fix the file or give it as JSON lines (.jsonl)"
            ) from e
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of LLaVA samples, got {type(data).__name__}")
        entries = [(f"{path}#{i}", d) for i, d in enumerate(data)]
    records = []
    for source, d in entries:
        if isinstance(d, BadSample):
            records.append(Record(source, error=d))
            continue
        if isinstance(d, dict) and "id" in d:
            source = f"{source} (id {d['id']})"
        if not isinstance(d, dict) or not isinstance(d.get("conversations"), list):
            records.append(
                Record(source, error=BadSample("bad_record", f"{source}: no 'conversations' list"))
            )
            continue
        bad = conversation_problem(d["conversations"], source)
        if bad is not None:
            records.append(Record(source, error=bad))
            continue
        rec = Record(source, conversations=d["conversations"])
        if "image" in d:
            bad = resolve_image(root, d["image"], source)
            if bad is not None:
                records.append(bad)
                continue
            rec.image_path = str(root / d["image"])
        records.append(rec)
    return records


def expand_shards(patterns: list[str]) -> list[str]:
    """Sorted shard paths from paths / glob patterns (an unmatched pattern is an error)."""
    out: list[str] = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        if not hits or not all(os.path.exists(h) for h in hits):
            raise FileNotFoundError(f"no shard matches {p!r}; check data.shards (paths or glob patterns)")
        out.extend(hits)
    return out


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem), ext.lower()


def _record_from_group(shard: str, key: str, files: dict[str, bytes]) -> Record:
    source = f"{shard}:{key}"
    img_ext = next((e for e in IMAGE_EXTS if e in files), None)
    caption = None
    cap_ext = "txt" if "txt" in files else "json" if "json" in files else None
    if cap_ext is not None:
        # Strict UTF-8: a Latin-1 or binary caption would otherwise train as U+FFFD characters.
        try:
            text = files[cap_ext].decode("utf-8-sig")  # strict; a leading BOM is dropped
        except UnicodeDecodeError as e:
            return Record(
                source,
                error=BadSample(
                    "bad_caption_encoding",
                    f"{source}.{cap_ext}: caption is not UTF-8 ({e}); re-encode it as UTF-8 or drop the sample",
                ),
            )
        if cap_ext == "txt":
            caption = text.strip()
        else:
            try:
                meta = json.loads(text)
            except json.JSONDecodeError as e:
                return Record(source, error=BadSample("broken_json", f"{source}.json: {e}"))
            caption = meta.get("caption") if isinstance(meta, dict) else None
            if caption is not None and not isinstance(caption, str):
                return Record(
                    source,
                    error=BadSample(
                        "missing_caption",
                        f"{source}.json: 'caption' must be a string, got {type(caption).__name__}",
                    ),
                )
    if img_ext is None:
        return Record(
            source, error=BadSample("missing_image", f"{source}: no image member ({'/'.join(IMAGE_EXTS)})")
        )
    if not caption:
        return Record(
            source, error=BadSample("missing_caption", f"{source}: no caption (.txt or .json 'caption')")
        )
    return Record(source, caption=caption, image_bytes=files[img_ext])


def _has_end_marker(shard: str, end: int) -> bool:
    """Whether two zero blocks follow the last member (tarfile stops silently at a truncated header)."""
    with open(shard, "rb") as f:
        f.seek(end)
        tail = f.read(2 * tarfile.BLOCKSIZE)
    return len(tail) == 2 * tarfile.BLOCKSIZE and not any(tail)


def iter_tar_records(shard: str, skips: Skips) -> Iterator[Record]:
    """Records of one tar shard in member order; a truncated/corrupt shard ends early and is counted."""
    key, files = None, {}
    end = 0  # byte offset after the last member's data (uncompressed tars)
    try:
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if k != key and key is not None:
                    yield _record_from_group(shard, key, files)
                    files = {}
                key = k
                data = tar.extractfile(member).read()
                if len(data) != member.size:  # stream mode returns a short read at a truncation
                    raise tarfile.ReadError(f"member {member.name} has {len(data)} of {member.size} bytes")
                files[ext] = data
        if shard.endswith(".tar") and not _has_end_marker(shard, end):
            raise tarfile.ReadError("no end-of-archive marker after the last member")
    except (tarfile.TarError, EOFError, OSError) as e:
        message = f"{shard}: shard is truncated or corrupt ({e}); the rest of it is skipped"
        skips.add("truncated_shard", shard, message)
        logger.warning("%s", message)
        return  # the incomplete last group is dropped with the shard's remainder
    if key is not None:
        yield _record_from_group(shard, key, files)
