"""The teacher backends behind `Teacher` (train/teacher.py): timm, open_clip and transformers models.

Each backend loads weights from a local path only (never a hub download) and implements `extract`:
normalised pixels (n, 3, S, S) -> one feature map (n, h, w, C) per level of the teacher, all from a
single forward pass of the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from eve.configuration_eve import IMAGENET_MEAN, IMAGENET_STD
from eve.encoders import load_timm_weights, timm_weights_path
from eve.image_processing_eve import CLIP_MEAN, CLIP_STD
from train.teacher import Teacher, TeacherConfig

logger = logging.getLogger(__name__)


def level_indices(config: TeacherConfig, count: int, what: str, wrap: bool = False) -> list[int]:
    """Each level's layer as an index in [0, count): negative layers count from the end (`wrap`: any
    layer modulo count); an index out of range or named twice is an error naming the teacher."""
    layers = [level.layer for level in config.resolved_levels()]
    indices = [layer % count if wrap else layer + count if layer < 0 else layer for layer in layers]
    if not all(0 <= i < count for i in indices) or len(set(indices)) != len(indices):
        raise ValueError(
            f"teacher {config.name}: layers {layers} must name distinct {what} of its {count} "
            f"(indices {indices}; negative layers count from the end)"
        )
    return indices


class TimmTeacher(Teacher):
    """A timm `features_only` model: one intermediate feature map per level (channels-last)."""

    def __init__(self, config: TeacherConfig) -> None:
        import timm  # each backend imports its own package when chosen (the curate extra installs them)

        model = timm.create_model(config.name, pretrained=False, features_only=True)
        channels, strides = model.feature_info.channels(), model.feature_info.reduction()
        maps = level_indices(config, len(channels), "feature maps", wrap=True)
        super().__init__(
            config,
            width=[channels[i] for i in maps],
            stride=[strides[i] for i in maps],
            mean=model.pretrained_cfg.get("mean", IMAGENET_MEAN),
            std=model.pretrained_cfg.get("std", IMAGENET_STD),
        )
        self.model, self.map_indices = model, maps
        weights = timm_weights_path(config.name, config.weights)
        if weights is not None:
            load_timm_weights(model, weights, config.name)
        else:
            logger.warning("timm teacher %s has random weights (no weights file given)", config.name)

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per level (n, h, w, C) of its feature map, from one pass of the model."""
        maps = self.model(x)
        return [maps[i].permute(0, 2, 3, 1) for i in self.map_indices]


class OpenClipTeacher(Teacher):
    """An open_clip visual tower; tokens of each level's transformer block, prefix tokens dropped."""

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
        depth = len(visual.trunk.blocks) if hasattr(visual, "trunk") else len(visual.transformer.resblocks)
        blocks = level_indices(config, depth, "blocks")
        self.blocks = sorted(blocks)  # forward_intermediates returns blocks in ascending order
        self.positions = [self.blocks.index(b) for b in blocks]

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per level (n, th, tw, C) of its block, from one forward pass."""
        n = x.shape[0]
        g = x.shape[-1] // self.stride
        if hasattr(self.visual, "trunk"):  # timm towers (EVA-CLIP): forward_intermediates
            out = self.visual.trunk.forward_intermediates(
                x, indices=self.blocks, output_fmt="NLC", intermediates_only=True
            )
        else:  # open_clip's own VisionTransformer
            out = self.visual.forward_intermediates(
                x, indices=self.blocks, output_fmt="NLC", intermediates_only=True
            )["image_intermediates"]
        maps = []
        for tokens in (out[i] for i in self.positions):
            if tokens.ndim == 4:  # NCHW feature map
                maps.append(tokens.permute(0, 2, 3, 1))
            else:
                maps.append(tokens[:, -g * g :].reshape(n, g, g, -1))  # drop CLS / register tokens
        return maps


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


class HFVisionTeacher(Teacher):
    """A local transformers vision transformer: hidden_states[layer] of each level, prefix tokens dropped."""

    def __init__(self, config: TeacherConfig, model: nn.Module, mean, std) -> None:
        vc = model.config
        super().__init__(config, width=vc.hidden_size, stride=vc.patch_size, mean=mean, std=std)
        self.model = model
        # hidden_states: index 0 = the embeddings, i = after block i
        self.hidden_indices = level_indices(config, vc.num_hidden_layers + 1, "hidden states")

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per level (n, th, tw, C) of its hidden state, from one forward pass."""
        out = self.model(pixel_values=x, output_hidden_states=True)
        n, g = x.shape[0], x.shape[-1] // self.stride
        # The patch tokens are the last g*g: CLS (and DINOv2's register tokens) come first.
        return [out.hidden_states[i][:, -g * g :].reshape(n, g, g, -1) for i in self.hidden_indices]


def _local_dir(config: TeacherConfig, what: str) -> str:
    if not config.weights or not Path(config.weights).is_dir():
        raise FileNotFoundError(
            f"{config.backend} teacher needs `weights` = a local {what} directory, got {config.weights!r}"
        )
    return config.weights


class HFClipTeacher(HFVisionTeacher):
    """A local transformers CLIPVisionModel directory; hidden_states[layer], CLS dropped."""

    def __init__(self, config: TeacherConfig) -> None:
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(_local_dir(config, "CLIPVisionModel"), local_files_only=True)
        super().__init__(config, model, mean=CLIP_MEAN, std=CLIP_STD)


class HFDinov2Teacher(HFVisionTeacher):
    """A local transformers DINOv2 directory (with or without registers); hidden_states[layer]."""

    def __init__(self, config: TeacherConfig) -> None:
        from transformers import AutoModel

        path = _local_dir(config, "DINOv2 (Dinov2Model)")
        model = AutoModel.from_pretrained(path, local_files_only=True)
        if model.config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(
                f"hf_dinov2 teacher: {path} holds a {model.config.model_type!r} model, not DINOv2"
            )
        super().__init__(config, model, mean=IMAGENET_MEAN, std=IMAGENET_STD)


BACKENDS: dict[str, type[Teacher]] = {
    "timm": TimmTeacher,
    "open_clip": OpenClipTeacher,
    "hf_clip": HFClipTeacher,
    "hf_dinov2": HFDinov2Teacher,
}
