"""Pretrained vision encoders of the encoder front-end: local weights only, patch tokens of tapped layers.

An encoder maps its square view `(n, 3, S, S)` (normalised its own way, see EncoderImageProcessor) to
the patch tokens of each layer it taps: a list of `(n, h*w, C)` in raster order, CLS and other prefix
tokens dropped. Kinds (`ENCODERS`):

| kind | architecture from | weights from (`path`) | `layers` index |
|---|---|---|---|
| `hf_clip`, `hf_siglip`, `hf_dinov2` | `arch`: the vision config dict | a local model directory | HF `hidden_states` (0 = embeddings, -2 = penultimate block) |
| `timm` | `name` | a local state-dict file; none for efficientnet_lite0: the embedded weights | `features_only` maps |
| `open_clip` (EVA-CLIP too) | `name` | a local state-dict file | transformer blocks (-2 = penultimate) |

The architecture is built from the config alone (`arch` or `name`), so a saved model rebuilds without
the original weights path; `arch` is read from the directory's config.json the first time
(`resolve_spec`) and stored in the model config from then on. Weights are read from `path` only by
`load_source_weights`, which the model calls when it initialises a new model. Nothing is downloaded,
no remote code runs; files load through safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eve.configuration_eve import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)


@dataclass
class EncoderSpec:
    """One pretrained vision encoder of an encoder front-end (an entry of `EveConfig.vision_encoders`)."""

    kind: str
    """hf_clip, hf_siglip, hf_dinov2, timm or open_clip (the table in this module's docstring)."""
    path: str | None = None
    """Local weights: a model directory (hf_*; a full CLIP/SigLIP checkpoint works too) or a state-dict
    file (timm, open_clip). None: the embedded ImageNet weights for timm efficientnet_lite0, random
    weights otherwise (tests)."""
    name: str | None = None
    """Architecture name for timm (e.g. efficientnet_lite0) and open_clip (e.g. EVA02-L-14-336)."""
    layers: list[int] = field(default_factory=lambda: [-2])
    """Tapped layers, each one (n, h*w, C) feature map (index meaning per kind: the table above). Only
    the comm connector reads more than one layer of an encoder."""
    image_size: int = 336
    """S: side of the encoder's square input in px."""
    image_mean: list[float] | None = None
    """Per-channel RGB mean of the view (also the padding colour); None: the kind's own (CLIP, SigLIP
    0.5, ImageNet for DINOv2, timm's pretrained_cfg, CLIP for open_clip)."""
    image_std: list[float] | None = None
    """Per-channel RGB std of the view; None: the kind's own."""
    resample: str | None = None
    """Resize filter, "bicubic" or "bilinear"; None: the kind's own (bilinear for SigLIP, else bicubic)."""
    aspect: str = "pad"
    """How an image becomes square: "pad" = LLaVA-1.5's pad to square with the mean colour, then resize;
    "crop" = resize the short side to S and crop the centre (the CLIP image processor's default)."""
    arch: dict[str, Any] | None = None
    """hf_*: the vision config (transformers' `to_dict()`) the encoder is built from; None: read from
    `path` when first built, then stored here (so config.json holds it)."""

    def __post_init__(self) -> None:
        """Check the kind and the settings that do not need the architecture."""
        if self.kind not in ENCODERS:
            raise ValueError(f"Unknown encoder kind {self.kind!r}; choose one of {sorted(ENCODERS)}.")
        if self.kind in ("timm", "open_clip") and not self.name:
            raise ValueError(f"A {self.kind} encoder needs `name` (its architecture), got none.")
        if self.kind.startswith("hf_") and self.arch is None and self.path is None:
            raise ValueError(f"A {self.kind} encoder needs `path` (a local model directory) or `arch`.")
        if not self.layers:
            raise ValueError(f"Encoder {self.kind} {self.name or self.path}: `layers` is empty.")
        if self.aspect not in ("pad", "crop") or (self.resample or "bicubic") not in ("bicubic", "bilinear"):
            raise ValueError(
                f"Encoder {self.kind}: aspect must be 'pad' or 'crop' and resample 'bicubic' or "
                f"'bilinear', got {self.aspect!r} and {self.resample!r}."
            )

    @property
    def label(self) -> str:
        """A short name for messages."""
        return f"{self.kind} {self.name or self.path or '(random)'}"


def resolve_spec(spec: EncoderSpec) -> EncoderSpec:
    """A copy with every default filled: `arch` (hf_*, read from path/config.json), mean, std, resample."""
    cls = ENCODERS[spec.kind]
    arch = spec.arch
    if arch is None and spec.kind.startswith("hf_"):
        arch = cls.read_arch(spec)
    mean, std, resample = cls.default_stats(spec)
    return dataclasses.replace(
        spec,
        arch=arch,
        image_mean=list(spec.image_mean or mean),
        image_std=list(spec.image_std or std),
        resample=spec.resample or resample,
    )


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file read with weights_only (a "state_dict" or
    "model" entry is unwrapped, a DataParallel "module." prefix dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Encoder weights file {path} does not exist; set the encoder's `path`.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


class VisionEncoder(nn.Module):
    """Base of every kind. While frozen (no parameter requires grad, as built) it runs as at inference,
    even inside a training model: no autograd graph, BatchNorm keeps its statistics, no dropout."""

    width: int
    """C: width of the tapped features."""
    grid: tuple[int, int]
    """(h, w): patch grid of an S x S view."""

    def __init__(self, spec: EncoderSpec, width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.spec, self.width, self.grid = spec, width, grid

    @classmethod
    def default_stats(cls, spec: EncoderSpec) -> tuple[tuple[float, ...], tuple[float, ...], str]:
        """The kind's own (mean, std, resample)."""
        return CLIP_MEAN, CLIP_STD, "bicubic"

    @property
    def trainable(self) -> bool:
        """Whether any parameter requires grad (False by default: the front-end freezes encoders)."""
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> VisionEncoder:
        """Train mode only while trainable: a frozen encoder keeps its BatchNorm statistics and no dropout."""
        return super().train(mode and self.trainable)

    def load_source_weights(self) -> None:
        """Load the pretrained weights from `spec.path` (the model's initial value of this encoder)."""
        raise NotImplementedError

    def tap(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(n, 3, S, S) normalised pixels -> one (n, h*w, C) tensor per tapped layer."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The tapped features; no autograd graph while frozen (as LLaVA runs its vision tower)."""
        param = next(self.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            return self.tap(pixels.to(param.device, param.dtype))


# ------------------------------------------------------------------------------------------------
# transformers vision models


class HFVisionEncoder(VisionEncoder):
    """A transformers vision model (CLIPVisionModel, SiglipVisionModel, Dinov2Model) from its config."""

    # kind -> (model class, config class, prefix tokens dropped, mean, std, resample)
    KINDS = {
        "hf_clip": ("CLIPVisionModel", "CLIPVisionConfig", 1, CLIP_MEAN, CLIP_STD, "bicubic"),
        "hf_siglip": ("SiglipVisionModel", "SiglipVisionConfig", 0, (0.5,) * 3, (0.5,) * 3, "bilinear"),
        "hf_dinov2": ("Dinov2Model", "Dinov2Config", 1, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    }

    def __init__(self, spec: EncoderSpec) -> None:
        import transformers

        model_name, config_name, self.prefix = self.KINDS[spec.kind][:3]
        config = getattr(transformers, config_name).from_dict(spec.arch)
        patch, size = config.patch_size, spec.image_size
        if size % patch:
            raise ValueError(
                f"Encoder {spec.label}: image_size {size} is not a multiple of its patch {patch}."
            )
        super().__init__(spec, config.hidden_size, (size // patch, size // patch))
        self.model = getattr(transformers, model_name)(config)
        n_states = config.num_hidden_layers + 1
        if any(not -n_states <= i < n_states for i in spec.layers):
            raise ValueError(
                f"Encoder {spec.label}: layers {spec.layers} outside hidden_states 0..{n_states - 1}."
            )
        # CLIP and SigLIP hold position embeddings for one size; DINOv2 always interpolates its own.
        self.interpolate = spec.kind != "hf_dinov2" and size != config.image_size

    @classmethod
    def default_stats(cls, spec: EncoderSpec) -> tuple[tuple[float, ...], tuple[float, ...], str]:
        return cls.KINDS[spec.kind][3:]

    @classmethod
    def read_arch(cls, spec: EncoderSpec) -> dict[str, Any]:
        """The vision config dict of the local directory `spec.path` (a full CLIP/SigLIP config gives its vision part)."""
        import transformers

        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"Encoder {spec.label}: {path} is not a local model directory with a config.json; set the "
                "encoder's `path` to one (nothing is downloaded)."
            )
        config = getattr(transformers, cls.KINDS[spec.kind][1]).from_pretrained(
            str(path), local_files_only=True
        )
        arch = config.to_dict()
        for key in ("_name_or_path", "transformers_version", "architectures"):
            arch.pop(key, None)
        return arch

    def load_source_weights(self) -> None:
        if self.spec.path is None:
            logger.warning("Encoder %s has random weights (no path given).", self.spec.label)
            return
        import transformers

        source = getattr(transformers, self.KINDS[self.spec.kind][0]).from_pretrained(
            self.spec.path, local_files_only=True, dtype=torch.float32
        )
        self.model.load_state_dict(source.state_dict(), strict=True)

    def tap(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        states = self.model(pixel_values=pixels, output_hidden_states=True, **extra).hidden_states
        return [states[i][:, self.prefix :] for i in self.spec.layers]  # (n, h*w, C) each


# ------------------------------------------------------------------------------------------------
# timm


def load_timm_weights(model: nn.Module, path: str, name: str) -> None:
    """Load a local state dict into a timm model (features_only or not) with strict key matching.

    Keys are used as-is when they match timm's; otherwise (the efficientnet-lite0 package uses the
    lukemelas naming) they are mapped one-to-one in order after checking that every shape agrees.
    """
    import timm

    state = read_state_file(path)
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


def timm_weights_path(name: str, path: str | None) -> str | None:
    """`path`, or for efficientnet_lite0 without one the embedded ImageNet weights; None: random weights."""
    if path is None and name == "efficientnet_lite0":
        from eve.assets import efficientnet_lite0_weights_path

        return str(efficientnet_lite0_weights_path())
    return path


class TimmVisionEncoder(VisionEncoder):
    """A timm `features_only` model; each tap is one of its feature maps, flattened to (n, h*w, C)."""

    def __init__(self, spec: EncoderSpec) -> None:
        import timm

        model = timm.create_model(
            spec.name, pretrained=False, features_only=True, out_indices=tuple(spec.layers)
        )
        channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
        if len(set(channels)) > 1 or len(set(reductions)) > 1:
            raise ValueError(
                f"Encoder {spec.label}: taps {spec.layers} have widths {channels} and strides {reductions}; "
                "the taps of one encoder must share both (list another encoder for another map)."
            )
        side = math.ceil(spec.image_size / reductions[0])
        super().__init__(spec, channels[0], (side, side))
        self.model = model

    @classmethod
    def default_stats(cls, spec: EncoderSpec) -> tuple[tuple[float, ...], tuple[float, ...], str]:
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.name)
        if cfg is None:
            return IMAGENET_MEAN, IMAGENET_STD, "bicubic"
        resample = cfg.interpolation if cfg.interpolation in ("bicubic", "bilinear") else "bicubic"
        return tuple(cfg.mean), tuple(cfg.std), resample

    def load_source_weights(self) -> None:
        path = timm_weights_path(self.spec.name, self.spec.path)
        if path is None:
            logger.warning("Encoder %s has random weights (no path given).", self.spec.label)
            return
        load_timm_weights(self.model, path, self.spec.name)

    def tap(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        # timm returns the maps in network order (the order of `layers` when they are increasing).
        return [m.flatten(2).transpose(1, 2) for m in self.model(pixels)]  # (n, C, h, w) -> (n, h*w, C)


# ------------------------------------------------------------------------------------------------
# open_clip (EVA-CLIP included)


class OpenClipVisionEncoder(VisionEncoder):
    """The visual tower of an open_clip model; taps are transformer blocks, prefix tokens dropped."""

    def __init__(self, spec: EncoderSpec) -> None:
        try:
            import open_clip
        except ImportError as err:
            raise ImportError(
                f"Encoder {spec.label} needs open_clip: `.venv/bin/pip install open_clip_torch` (in the "
                "curate extra)."
            ) from err
        # open_clip moves the model to `device` itself: keep it where modules are being built (meta too).
        visual = open_clip.create_model(spec.name, pretrained=None, device=torch.get_default_device()).visual
        trunk = getattr(visual, "trunk", None)  # timm towers (EVA-CLIP)
        patch = (trunk.patch_embed if trunk is not None else visual).patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        width = trunk.num_features if trunk is not None else visual.transformer.width
        if spec.image_size % patch:
            raise ValueError(
                f"Encoder {spec.label}: image_size {spec.image_size} is not a multiple of {patch}."
            )
        side = spec.image_size // patch
        super().__init__(spec, width, (side, side))
        self.model = visual

    def load_source_weights(self) -> None:
        if self.spec.path is None:
            logger.warning("Encoder %s has random weights (no path given).", self.spec.label)
            return
        state = read_state_file(self.spec.path)
        if any(k.startswith("visual.") for k in state):  # a whole CLIP checkpoint: keep the image tower
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        self.model.load_state_dict(state, strict=True)

    def tap(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        n_patches = self.grid[0] * self.grid[1]
        owner = getattr(self.model, "trunk", self.model)
        out = owner.forward_intermediates(
            pixels, indices=list(self.spec.layers), output_fmt="NLC", intermediates_only=True
        )
        states = out["image_intermediates"] if isinstance(out, dict) else out
        return [s[:, -n_patches:] for s in states]  # prefix (CLS, register) tokens dropped


ENCODERS: dict[str, type[VisionEncoder]] = {
    "hf_clip": HFVisionEncoder,
    "hf_siglip": HFVisionEncoder,
    "hf_dinov2": HFVisionEncoder,
    "timm": TimmVisionEncoder,
    "open_clip": OpenClipVisionEncoder,
}
"""Encoder kind -> module class (built from a resolved EncoderSpec)."""


def build_encoder(spec: EncoderSpec) -> VisionEncoder:
    """The encoder module of a resolved spec, frozen and in eval mode (architecture only: weights via
    load_source_weights)."""
    return ENCODERS[spec.kind](spec).requires_grad_(False).eval()
