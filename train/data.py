"""Training data: webdataset shards or LLaVA JSON -> encoded samples -> length-planned batches.

Pipeline (one `EveDataset` per rank, iterated by DataLoader workers):
1. Records. Each consumer c = rank * num_workers + worker of n = world_size * num_workers reads a
   disjoint part of the data, so every record is read exactly once per epoch: LLaVA JSON records
   by a seeded per-epoch permutation (record perm[c::n]); tar shards whole (shuffled per epoch,
   shard k to consumer k % n) when there are at least n shards, else record i of the shard stream
   to consumer i % n.
2. Windows of `window` records. A window is encoded (image decode + tokenization) to learn each
   sample's length, bad records are skipped and counted by reason, the good ones are planned into
   batches (`train.packing.plan_batches`: length-aware, packed or padded), the batch order is
   shuffled, and each batch is encoded again with its pixels and collated in the worker. Only
   lengths and compressed bytes are held per window; decoding twice (~1,800 JPEG/s per core here)
   is cheaper than holding a window of float pixels.
3. Order and resume. Workers tag every batch with (consumer, window, batch index); `EveDataLoader`
   hands batches out in a fixed round-robin over workers (independent of DataLoader timing), and
   its `state_dict()` is the epoch plus each worker's (windows done, batches done in the current
   window). Resuming skips finished windows without decoding (JSON: by index; tar: bytes read, not
   decoded), re-plans the current window and drops its batches already used: the remaining
   batches are exactly those an uninterrupted run would have produced. The same world size,
   worker count, seed and window are required (checked).

Bad records (never fatal, always counted; `stats()` and a summary at the end of each epoch):
corrupt / missing image, image over `max_pixels` (refused before decoding), broken JSON (a .jsonl
line or a tar .json member), malformed conversation turns, caption not UTF-8, no or two <image>,
over-long (> max_length tokens), image path escaping the image root (.. or absolute), records
without caption or conversations, truncated tar shard (the shard's remainder is skipped). Each
skipped record of the first epoch is written to `skipped.jsonl` in the run directory (`log_dir`),
and every epoch ends with its count of good samples and what `train.epochs` means over them.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from eve.image_processing_eve import (
    MAX_PIXELS,
    ImageLoadError,
    ImageNotFoundError,
    ImageTooLargeError,
    open_image,
)
from train.packing import Collator, plan_batches
from train.records import BadSample, Record, Skips, expand_shards, iter_tar_records, load_json_records
from train.teacher import teacher_keys

logger = logging.getLogger(__name__)

POSITION_KEY = "__data_position__"


@dataclass
class DataOptions:
    """Everything the dataset needs besides the processor (the engine fills it from its DataConfig)."""

    shards: list[str] = field(default_factory=list)
    """Webdataset tar shards or glob patterns (image + `.txt` caption or `.json` with "caption")."""
    json: str | None = None
    """LLaVA JSON (a list) or JSON-lines file."""
    image_root: str | None = None
    """Root of the JSON's relative image paths (paths may not leave it); default: the JSON's folder."""
    template: str = "plain"
    """Template for `EveProcessor.encode` ("plain" for captions, "vicuna_v1" for SFT)."""
    max_length: int = 2048
    """Longest sample in tokens; longer ones are skipped and counted (never truncated through an image)."""
    packing: bool = True
    """Packed rows (see train/packing.py) or right-padded rows."""
    batch_size: int | None = 4
    """Samples per batch (packed into rows of max_length); exclusive with tokens_per_batch."""
    tokens_per_batch: int | None = None
    """Fixed token budget per batch (rows of max_length); set batch_size None to use it."""
    window: int = 512
    """Records per length-bucketing / shuffle window (also the resume granularity)."""
    shuffle: bool = True
    """Seeded shuffling of records (per epoch) and of batches within a window."""
    seed: int = 0
    """Seed of all shuffling."""
    max_samples: int | None = None
    """Use only the first N records (before sharding)."""
    drop_text_only: bool = False
    """Skip samples without an image (counted as 'text_only_dropped')."""
    max_pixels: int | None = MAX_PIXELS
    """Largest source image in pixels (width x height), read from the file's header before decoding;
    larger ones are skipped as 'image_too_large' (None: no limit but Pillow's bomb check)."""


class SampleEncoder:
    """Record -> encoded sample dict (input_ids, labels, pixels, teacher views, length) or BadSample."""

    def __init__(self, processor, options: DataOptions, teacher_views: list | None = None) -> None:
        self.processor = processor
        self.options = options
        self.teacher_views = list(teacher_views or [])

    def __call__(self, rec: Record, with_pixels: bool = True) -> dict:
        """Encode one record; raises BadSample with a reason."""
        if rec.error is not None:
            raise rec.error
        if rec.conversations is not None:
            conversations = rec.conversations
        else:
            conversations = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": rec.caption}]
        image = None
        if rec.image_path is not None or rec.image_bytes is not None:
            fp = rec.image_path if rec.image_path is not None else io.BytesIO(rec.image_bytes)
            try:  # decoded now (size checked first): bad files fail here, not in the model
                image = open_image(fp, rec.image_path or rec.source, self.options.max_pixels)
            except ImageNotFoundError as e:
                raise BadSample("missing_image", f"{rec.source}: {e}") from e
            except ImageTooLargeError as e:
                raise BadSample("image_too_large", f"{rec.source}: {e}") from e
            except ImageLoadError as e:
                raise BadSample("corrupt_image", f"{rec.source}: {e}") from e
        elif self.options.drop_text_only:
            raise BadSample("text_only_dropped", f"{rec.source}: text-only sample dropped")
        try:
            enc = self.processor.encode(
                conversations, image, template=self.options.template, sample_id=rec.source
            )
        except ValueError as e:
            msg = str(e)
            reason = "bad_image_placeholder" if "placeholder" in msg else "bad_conversation"
            if isinstance(e, ImageLoadError):
                reason = "corrupt_image"
            raise BadSample(reason, f"{rec.source}: {msg}") from e
        n = len(enc["input_ids"])
        if n > self.options.max_length:
            raise BadSample("too_long", f"{rec.source}: {n} tokens > max_length {self.options.max_length}")
        enc["length"] = n
        if not with_pixels:
            enc.pop("pixel_values", None)
            return enc
        if image is not None:
            for i, view in enumerate(self.teacher_views):
                tv = view.render([image], self.processor.image_processor.resample)
                pix, boxes = teacher_keys(i)
                enc[pix], enc[boxes] = tv["teacher_pixel_values"], tv["teacher_image_boxes"]
        return enc


# ----------------------------------------------------------------------------------------------
# the dataset


@dataclass
class WorkerPosition:
    """Where one worker is in the current epoch."""

    windows_done: int = 0
    """Windows fully consumed."""
    batches_done: int = 0
    """Batches consumed of the current window."""
    finished: bool = False
    """All of this worker's batches of the epoch were consumed."""


class EveDataset(IterableDataset):
    """Yields collated batches (tagged with their data position) for one rank; see the module docstring."""

    def __init__(
        self,
        options: DataOptions,
        encoder: SampleEncoder | Any,
        collator: Collator,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if options.json is None and not options.shards:
            raise ValueError("no training data: set data.json (LLaVA JSON) or data.shards (webdataset tars)")
        self.options, self.encoder, self.collator = options, encoder, collator
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 0)
        self.epoch = 0
        self.positions = [WorkerPosition() for _ in range(max(self.num_workers, 1))]
        self._json_records: list[Record] | None = None
        self._shards = expand_shards(options.shards) if options.shards else []

    # --- records -------------------------------------------------------------------------------
    def _consumer(self, worker: int) -> tuple[int, int]:
        n_workers = max(self.num_workers, 1)
        return self.rank * n_workers + worker, self.world_size * n_workers

    def _records(self, worker: int, stats: Skips) -> Iterator[Record]:
        """This worker's records of the epoch, in order."""
        c, n = self._consumer(worker)
        rng = random.Random(f"{self.options.seed}-{self.epoch}")
        if self.options.json is not None:
            if self._json_records is None:
                self._json_records = load_json_records(self.options.json, self.options.image_root)
            recs = self._json_records[: self.options.max_samples]
            order = list(range(len(recs)))
            if self.options.shuffle:
                rng.shuffle(order)
            for i in order[c::n]:
                yield recs[i]
            return
        shards = list(self._shards)
        if self.options.shuffle:
            rng.shuffle(shards)
        if len(shards) >= n:
            count = 0
            for shard in shards[c::n]:  # max_samples per consumer is approximate here
                for rec in iter_tar_records(shard, stats):
                    if self.options.max_samples is not None and count * n >= self.options.max_samples:
                        return
                    count += 1
                    yield rec
            return
        i = 0
        for shard in shards:
            for rec in iter_tar_records(shard, stats if c == 0 else Skips()):  # count a shard once
                if self.options.max_samples is not None and i >= self.options.max_samples:
                    return
                if i % n == c:
                    yield rec
                i += 1

    # --- windows and batches -------------------------------------------------------------------
    def _windows(self, worker: int, stats: Skips) -> Iterator[list[Record]]:
        window: list[Record] = []
        for rec in self._records(worker, stats):
            window.append(rec)
            if len(window) == self.options.window:
                yield window
                window = []
        if window:
            yield window

    def _plan(self, window: list[Record], stats: Skips, seed: str) -> tuple[list[Record], list]:
        """Encode a window for lengths (bad records counted), plan and shuffle its batches."""
        good, lengths = [], []
        for rec in window:
            try:
                lengths.append(self.encoder(rec, with_pixels=False)["length"])
                good.append(rec)
            except BadSample as e:
                stats.add(e.reason, rec.source, str(e))
                logger.debug("skipped %s", e)
            except Exception as e:  # an unexpected failure must not stop a long run: count and log it
                message = f"{rec.source}: could not be encoded ({type(e).__name__}: {e}); skipped"
                stats.add("encode_error", rec.source, message)
                logger.warning("%s", message)
        o = self.options
        batches = plan_batches(
            lengths,
            max_length=o.max_length,
            packing=o.packing,
            batch_size=o.batch_size,
            tokens_per_batch=o.tokens_per_batch,
        )
        if o.shuffle:
            random.Random(seed).shuffle(batches)
        return good, batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != max(self.num_workers, 1):
            raise ValueError(
                f"EveDataset was built for {self.num_workers} workers but runs under {info.num_workers}; "
                "build it with the DataLoader's num_workers"
            )
        pos = self.positions[worker]
        if pos.finished:
            return
        stats = Skips()  # reported with the next batch handed out (counts and skipped.jsonl lines)
        c, _ = self._consumer(worker)
        for w_idx, window in enumerate(self._windows(worker, stats)):
            if w_idx < pos.windows_done:
                stats.clear()  # counted before the interruption (restored from the state)
                continue
            skip = pos.batches_done if w_idx == pos.windows_done else 0
            good, batches = self._plan(window, stats, f"{self.options.seed}-{self.epoch}-{c}-{w_idx}")
            if skip:
                stats.clear()  # this window's bad records were counted before the interruption
            for b_idx, batch_rows in enumerate(batches):
                if b_idx < skip:
                    continue
                rows = []
                for row in batch_rows:
                    samples = []
                    for i in row:
                        try:
                            samples.append(self.encoder(good[i]))
                        except BadSample as e:  # deterministic encoders never get here
                            stats.add(e.reason, good[i].source, str(e))
                        except Exception as e:
                            message = (
                                f"{good[i].source}: could not be encoded ({type(e).__name__}: {e}); skipped"
                            )
                            stats.add("encode_error", good[i].source, message)
                            logger.warning("%s", message)
                    if samples:
                        rows.append(samples)
                if not rows:
                    continue
                batch = self.collator(rows)
                batch[POSITION_KEY] = {
                    "worker": worker,
                    "window": w_idx,
                    "batch": b_idx,
                    "last_in_window": b_idx == len(batches) - 1,
                    "samples": sum(len(r) for r in batch_rows),
                    "stats": dict(stats.counts),
                    "skipped": list(stats.lines),
                }
                stats.clear()
                yield batch
            if not batches:
                # an all-bad window still reports its counts
                yield {
                    POSITION_KEY: {
                        "worker": worker,
                        "window": w_idx,
                        "batch": -1,
                        "last_in_window": True,
                        "samples": 0,
                        "stats": dict(stats.counts),
                        "skipped": list(stats.lines),
                    }
                }
                stats.clear()
        yield {
            POSITION_KEY: {
                "worker": worker,
                "end": True,
                "stats": dict(stats.counts),
                "skipped": list(stats.lines),
            }
        }
