"""Batch collation: padded rows or packed rows (several samples per row), plus the batch planner.

A sample is a dict from `EveProcessor.encode` (+ the dataset's teacher views):
    input_ids, labels: list[int] or 1-D tensors (image runs already expanded),
    pixel_values (P, 3*p*p), image_grid_hw (1, 2)            (image samples only),
    teacher_pixel_values (1, 3, S, S), teacher_image_boxes (1, 4) (+ "_1", ... for more views).

Packed rows (default): samples are concatenated in a row, `position_ids` restart at 0 at every
sample start (the pad tail restarts too) and `attention_mask` is omitted. transformers 5.23 turns
restarting position_ids into a block-diagonal causal mask for sdpa/eager
(`masking_utils.find_packed_sequence_indices`, used only when attention_mask is None *and*
past_key_values is None, so the forward must run with use_cache=False) and into varlen
flash-attention (`_is_packed_sequence`). The first label of every packed sample is set to -100: it
would be predicted from the previous sample's last token; unpacked, position 0 is never a target.

Padded rows: right padding, `attention_mask` 1 on tokens, 0 on padding.

Images are numbered in the order their token runs appear (row by row, left to right):
pixel_values are concatenated, image_grid_hw and the teacher tensors stacked in that order.

ZeRO-3: every rank must run the same parameter gathers, so a batch without any image gets a dummy
image (`DummyImage`): a 1x1-token image (3 positions, labels -100; an encoder front-end's: one zero
row of its views, T positions) in its own packed segment (or its own padded row), zero pixels,
teacher box all 0. It adds no CE term and no aligning term (no
valid teacher patch) yet runs the PEL, the aligning heads and the teacher like any image.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from eve.configuration_eve import IGNORE_INDEX
from train.teacher import teacher_keys


@dataclass
class DummyImage:
    """The smallest placeholder image added to image-free batches (ZeRO-3 lockstep): the PEL's 1x1-token
    image, or for an encoder front-end one zero row of its views (T tokens)."""

    patch_dim: int
    """Width of a pixel_values row: 3 * p * p (PEL), every encoder view's 3 * S * S (encoder front-end)."""
    conv_stride: int
    """s: a 1x1 token grid holds s*s patch rows (PEL); 1 for an encoder front-end (one row per image)."""
    image_token_index: int = -200
    """Id of image positions in input_ids."""
    teacher_sizes: list[int] = field(default_factory=list)
    """S of each distinct teacher view (one zero view per entry)."""
    grid_hw: tuple[int, int] = (1, 1)
    """Its image_grid_hw: (1, 1) for the PEL, (1, T) for an encoder front-end."""
    num_tokens: int = 3
    """Its positions in input_ids: 1 + h*(w+1) = 3 for the PEL's 1x1 grid, T for an encoder front-end."""

    def sample(self) -> dict:
        """A sample dict holding only the dummy image (no supervised token)."""
        s = {
            "input_ids": [self.image_token_index] * self.num_tokens,
            "labels": [IGNORE_INDEX] * self.num_tokens,
            "pixel_values": torch.zeros(self.conv_stride**2, self.patch_dim),
            "image_grid_hw": torch.tensor([list(self.grid_hw)]),
        }
        for i, size in enumerate(self.teacher_sizes):
            pix, boxes = teacher_keys(i)
            s[pix] = torch.zeros(1, 3, size, size)
            s[boxes] = torch.zeros(1, 4, dtype=torch.long)  # no valid area: no aligning loss
        return s

    @classmethod
    def from_config(cls, config, teacher_sizes: Sequence[int] = ()) -> DummyImage:
        """From an EveConfig and the teacher view sizes."""
        if config.vision_frontend == "encoders":
            from eve.image_processing_encoders import EncoderImageProcessor

            processor = EncoderImageProcessor.from_config(config)
            width = sum(3 * v["image_size"] ** 2 for v in processor.views)
            tokens = processor.num_tokens
            return cls(width, 1, config.image_token_index, list(teacher_sizes), (1, tokens), tokens)
        p, s = config.vision_patch_size, config.vision_conv_stride
        return cls(3 * p * p, s, config.image_token_index, list(teacher_sizes))


def sample_length(sample: dict) -> int:
    """Number of tokens of an encoded sample."""
    return len(sample["input_ids"])


def has_image(sample: dict) -> bool:
    """Whether the sample carries an image."""
    return sample.get("image_grid_hw") is not None


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of sample indices into rows of at most `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the row capacity {capacity}")
        j = bisect.bisect_left(free, (n, -1))  # the tightest row that still fits
        if j == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            rem, r = free.pop(j)
            rows[r].append(i)
            bisect.insort(free, (rem - n, r))
    return rows


def plan_batches(
    lengths: Sequence[int],
    *,
    max_length: int,
    packing: bool,
    batch_size: int | None = None,
    tokens_per_batch: int | None = None,
) -> list[list[list[int]]]:
    """Group sample indices into batches of rows: each batch is a list of rows, a row a list of indices.

    tokens_per_batch (fixed token budget per batch, the default when given): packing fills rows of
    `max_length` by best-fit decreasing and takes tokens_per_batch // max_length rows per batch;
    padded batches take length-sorted samples while rows * longest <= tokens_per_batch.
    batch_size (fixed samples per batch, the paper's counting): consecutive length-sorted groups of
    batch_size samples; packed, each group is bin-packed into rows of max_length.
    The caller shuffles the batch order (length sorting would otherwise order batches by length).
    """
    if (batch_size is None) == (tokens_per_batch is None):
        raise ValueError("give exactly one of batch_size (samples per batch) and tokens_per_batch")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[list[int]]] = []
    if tokens_per_batch is not None:
        if tokens_per_batch < max_length:
            raise ValueError(f"tokens_per_batch ({tokens_per_batch}) must be >= max_length ({max_length})")
        if packing:
            rows = pack_rows(lengths, max_length)
            per = tokens_per_batch // max_length
            batches = [rows[k : k + per] for k in range(0, len(rows), per)]
        else:
            cur: list[list[int]] = []
            for i in order:  # ascending: the new sample is the longest of the batch
                if cur and (len(cur) + 1) * lengths[i] > tokens_per_batch:
                    batches.append(cur)
                    cur = []
                cur.append([i])
            if cur:
                batches.append(cur)
        return batches
    for k in range(0, len(order), batch_size):
        group = order[k : k + batch_size]
        if packing:
            rows = pack_rows([lengths[i] for i in group], max_length)
            batches.append([[group[j] for j in row] for row in rows])
        else:
            batches.append([[i] for i in group])
    return batches


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


@dataclass
class Collator:
    """Builds model batches from rows of samples (packed) or one sample per row (padded)."""

    pad_token_id: int = 0
    """Id written in padding positions (Vicuna/Llama: 0)."""
    packing: bool = True
    """Packed rows with restarting position_ids; False: right-padded rows with attention_mask."""
    pad_to_multiple_of: int = 8
    """Round the row length up to this multiple (tensor-core friendly shapes)."""
    dummy_image: DummyImage | None = None
    """If set, a batch without any image gets this placeholder image (needed under ZeRO-3)."""
    num_teacher_views: int = 0
    """Number of distinct teacher views to stack (teacher_keys(0..n-1))."""
    one_row: bool = False
    """Packed only: put all rows of a batch end to end in a single row, so that no padded tail is
    computed (at most pad_to_multiple_of - 1 tokens). For attention backends that split a row at its
    segments ("sdpa_packed", flash-attention varlen), where a row's length costs nothing by itself; a
    dense-mask backend ("sdpa", "eager") would pay (total tokens)^2 for it."""

    def __call__(self, rows: list[list[dict]] | list[dict]) -> dict:
        """A batch dict of model kwargs (+ teacher tensors) from rows of samples (or plain samples)."""
        rows = [r if isinstance(r, list) else [r] for r in rows]
        if not self.packing:
            rows = [[s] for r in rows for s in r]
        elif self.one_row and rows:
            rows = [[s for r in rows for s in r]]
        if self.dummy_image is not None and not any(has_image(s) for r in rows for s in r):
            dummy = self.dummy_image.sample()
            if self.packing and rows:
                shortest = min(range(len(rows)), key=lambda i: sum(map(sample_length, rows[i])))
                rows[shortest] = [*rows[shortest], dummy]
            else:
                rows.append([dummy])
        return self._collate(rows)

    def _collate(self, rows: list[list[dict]]) -> dict:
        lengths = [sum(sample_length(s) for s in r) for r in rows]
        width = _round_up(max(lengths), self.pad_to_multiple_of)
        b = len(rows)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((b, width), dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        pixels, grids = [], []
        teacher = [([], []) for _ in range(self.num_teacher_views)]
        for r, row in enumerate(rows):
            t = 0
            for s in row:
                ids, lab = _as_list(s["input_ids"]), _as_list(s["labels"])
                n = len(ids)
                input_ids[r, t : t + n] = torch.tensor(ids)
                labels[r, t : t + n] = torch.tensor(lab)
                if self.packing:
                    labels[r, t] = IGNORE_INDEX  # never predict a sample's first token from the previous one
                position_ids[r, t : t + n] = torch.arange(n)
                attention_mask[r, t : t + n] = 1
                if has_image(s):
                    pixels.append(s["pixel_values"])
                    grids.append(torch.as_tensor(s["image_grid_hw"]).reshape(-1, 2))
                    for v in range(self.num_teacher_views):
                        pix, box = teacher_keys(v)
                        if pix not in s:
                            raise KeyError(
                                f"sample with an image has no '{pix}'; the dataset must add teacher views"
                            )
                        teacher[v][0].append(s[pix])
                        teacher[v][1].append(torch.as_tensor(s[box]).reshape(-1, 4))
                t += n
            position_ids[r, t:] = torch.arange(width - t)  # the pad tail is its own segment
        batch = {"input_ids": input_ids, "labels": labels}
        if self.packing:
            batch["position_ids"] = position_ids
        else:
            batch["attention_mask"] = attention_mask
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_hw"] = torch.cat(grids).long()
            for v, (pix_list, box_list) in enumerate(teacher):
                pix, box = teacher_keys(v)
                batch[pix] = torch.cat(pix_list)
                batch[box] = torch.cat(box_list).long()
        return batch
