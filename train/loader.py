"""The resumable loader of one rank: deterministic batch order, data position, bad-sample reports.

`EveDataLoader` iterates an `EveDataset` (train/data.py) through a torch DataLoader, hands batches
out in a fixed round-robin over its workers, keeps the position that a checkpoint saves, counts the
skipped records by reason, writes them to `skipped.jsonl` and reports each epoch's good samples.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import DataLoader

from train.data import POSITION_KEY, DataOptions, EveDataset, SampleEncoder, WorkerPosition
from train.packing import Collator

logger = logging.getLogger(__name__)


# Counted per shard, not per record: not part of an epoch's record count.
_NOT_RECORDS = ("truncated_shard",)


def skipped_file(log_dir: str | Path, rank: int = 0, world_size: int = 1) -> Path:
    """This rank's list of skipped records in a run directory: skipped.jsonl, or skipped.rank{r}.jsonl."""
    return Path(log_dir) / ("skipped.jsonl" if world_size == 1 else f"skipped.rank{rank}.jsonl")


class EveDataLoader:
    """A DataLoader over an EveDataset with deterministic order, resumable position and bad-sample stats."""

    def __init__(
        self,
        dataset: EveDataset,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        *,
        epochs: float | None = None,
        total_samples: int | None = None,
        skipped_path: str | Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if dataset.num_workers > 0 else None
        self.epochs = epochs
        """`train.epochs` of an epochs-based run: each epoch's end says how many passes over its good
        samples that really is (bad records are in the step count, not in the data)."""
        self.total_samples = total_samples
        """Samples the whole run consumes, all ranks together (a max_steps run: steps x global batch);
        used for the same end-of-epoch line when `epochs` is None."""
        self.skipped_path = Path(skipped_path) if skipped_path is not None else None
        """File that gets one JSON line {source, reason, message} per record skipped in the first epoch."""
        self.samples_consumed = 0
        """Samples handed out this epoch."""
        self.last_batch_samples = 0
        """Samples in the batch most recently handed out."""
        self._stats: Counter = Counter()
        self._epoch_stats: Counter = Counter()  # skipped this epoch, by reason
        self._skipped_lines: int | None = 0  # lines of skipped_path this run wrote (None: unknown)
        self._skipped_synced = False
        self._next_worker = 0

    def stats(self) -> dict[str, int]:
        """Bad records skipped so far, by reason (cumulative over epochs and resumes)."""
        return dict(self._stats)

    def log_summary(self) -> None:
        """Log the skipped-record counts."""
        if self._stats:
            total = sum(self._stats.values())
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self._stats.items()))
            logger.warning("data: skipped %d bad records this run (%s)", total, detail)
        else:
            logger.info("data: no bad records")

    def log_epoch(self) -> None:
        """Log the epoch's good samples and records, and what the configured length means over them."""
        ds = self.dataset
        good = self.samples_consumed
        skipped = sum(v for k, v in self._epoch_stats.items() if k not in _NOT_RECORDS)
        records = good + skipped
        where = f"epoch {ds.epoch + 1}" + (
            f" (rank {ds.rank} of {ds.world_size})" if ds.world_size > 1 else ""
        )
        line = f"{where}: {good:,} good samples of {records:,} records ({skipped:,} skipped)"
        if good == 0:
            logger.warning("data: %s: no good sample at all; see the skipped-record counts", line)
            return
        if self.epochs is not None:
            # The step count is epochs x records, so the good data is seen epochs x records / good times.
            passes = self.epochs * records / good
            line += f": train.epochs {self.epochs:g} is {passes:.2f} passes over the good data"
        elif self.total_samples is not None:
            per_rank = self.total_samples / ds.world_size
            on_rank = f" ({per_rank:,.0f} on this rank)" if ds.world_size > 1 else ""
            line += (
                f": the run's {self.total_samples:,} samples{on_rank} are {per_rank / good:.2f} passes "
                "over the good data"
            )
        (logger.warning if skipped else logger.info)("data: %s", line)

    def _sync_skipped_file(self) -> None:
        """Keep only the lines this run's position accounts for: a resumed run drops the lines written
        after its checkpoint (their batches come again), a fresh run those of an earlier run."""
        self._skipped_synced = True
        path = self.skipped_path
        if path is None or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if self._skipped_lines is None:  # a checkpoint from before skipped.jsonl: keep the file as it is
            self._skipped_lines = len(lines)
        elif len(lines) > self._skipped_lines:
            path.write_text("".join(lines[: self._skipped_lines]), encoding="utf-8")

    def _write_skipped(self, entries: list[dict]) -> None:
        """Append one JSON line per skipped record (first epoch only: later epochs skip the same ones)."""
        if self.skipped_path is None or not entries or self.dataset.epoch != 0:
            return
        self.skipped_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.skipped_path, "a", encoding="utf-8") as f:  # ASCII JSON: any file name is safe
            f.write("".join(json.dumps(e) + "\n" for e in entries))
        self._skipped_lines = (self._skipped_lines or 0) + len(entries)

    def _loader(self) -> DataLoader:
        ds = self.dataset
        return DataLoader(
            ds,
            batch_size=None,
            num_workers=ds.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
        )

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch's batches; the epoch advances when it is exhausted."""
        ds = self.dataset
        n_workers = max(ds.num_workers, 1)
        queues: dict[int, list[dict]] = {w: [] for w in range(n_workers)}
        ended = {w for w in range(n_workers) if ds.positions[w].finished}
        if not self._skipped_synced:
            self._sync_skipped_file()
        it = iter(self._loader())
        while len(ended) < n_workers:
            w = self._next_worker
            if w in ended:
                self._next_worker = (w + 1) % n_workers
                continue
            if not queues[w]:
                item = next(it)
                meta = item[POSITION_KEY]
                queues[meta["worker"]].append(item)
                continue
            item = queues[w].pop(0)
            meta = item.pop(POSITION_KEY)
            self._stats.update(meta["stats"])
            self._epoch_stats.update(meta["stats"])
            self._write_skipped(meta["skipped"])
            pos = ds.positions[w]
            if meta.get("end"):
                pos.finished = True
                ended.add(w)
                self._next_worker = (w + 1) % n_workers
                continue
            if meta["last_in_window"]:
                pos.windows_done, pos.batches_done = meta["window"] + 1, 0
            else:
                pos.windows_done, pos.batches_done = meta["window"], meta["batch"] + 1
            if meta["batch"] < 0:
                continue  # an all-bad window: only its counts
            self._next_worker = (w + 1) % n_workers
            self.samples_consumed += meta["samples"]
            self.last_batch_samples = meta["samples"]
            yield item
        self.log_epoch()
        self.log_summary()
        ds.epoch += 1
        ds.positions = [WorkerPosition() for _ in range(n_workers)]
        self.samples_consumed = 0
        self._epoch_stats.clear()
        self._next_worker = 0

    def state_dict(self) -> dict:
        """The data position: epoch, per-worker window/batch counters, next worker, stats, layout."""
        ds = self.dataset
        return {
            "epoch": ds.epoch,
            "samples_consumed": self.samples_consumed,
            "next_worker": self._next_worker,
            "positions": [vars(p).copy() for p in ds.positions],
            "stats": dict(self._stats),
            "epoch_stats": dict(self._epoch_stats),
            "skipped_lines": self._skipped_lines,
            "layout": {
                "world_size": ds.world_size,
                "num_workers": ds.num_workers,
                "seed": ds.options.seed,
                "window": ds.options.window,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` (the same world size, workers, seed and window are required)."""
        ds = self.dataset
        want = {
            "world_size": ds.world_size,
            "num_workers": ds.num_workers,
            "seed": ds.options.seed,
            "window": ds.options.window,
        }
        if state["layout"] != want:
            raise ValueError(
                f"data position was saved with {state['layout']} but this run has {want}; resume with the "
                "same world size, data.workers, seed and window (or start the data from the epoch start)"
            )
        ds.epoch = state["epoch"]
        ds.positions = [WorkerPosition(**p) for p in state["positions"]]
        self.samples_consumed = state["samples_consumed"]
        self._next_worker = state["next_worker"]
        self._stats = Counter(state["stats"])
        self._epoch_stats = Counter(state.get("epoch_stats", {}))  # absent in older checkpoints
        self._skipped_lines = state.get("skipped_lines")
        self._skipped_synced = False


def build_dataloader(
    options: DataOptions,
    processor,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    teacher_views: list | None = None,
    dummy_image=None,
    epochs: float | None = None,
    total_samples: int | None = None,
    log_dir: str | Path | None = None,
    one_row: bool = False,
) -> EveDataLoader:
    """The engine's entry point: dataset + collator + loader for one rank.

    teacher_views: `TeacherSet.views` (one teacher tensor pair per distinct view); dummy_image:
    `DummyImage.from_config(model_config, [v.size for v in views])` under ZeRO-3 (or always: it
    costs 3 tokens on image-free batches only). epochs / total_samples: the run's length, for the
    end-of-epoch line (see `EveDataLoader`). log_dir: the run directory, where this rank's skipped
    records are written (`skipped_file`); None: not written. one_row: packed batches as one row
    (`Collator.one_row`: no computed padding; for segment-splitting attention backends only).
    """
    views = list(teacher_views or [])
    collator = Collator(
        pad_token_id=processor.pad_token_id,
        packing=options.packing,
        one_row=one_row and options.packing,
        dummy_image=dummy_image,
        num_teacher_views=len(views),
    )
    encoder = SampleEncoder(processor, options, views)
    return EveDataLoader(
        EveDataset(options, encoder, collator, rank, world_size, num_workers),
        epochs=epochs,
        total_samples=total_samples,
        skipped_path=None if log_dir is None else skipped_file(log_dir, rank, world_size),
    )
