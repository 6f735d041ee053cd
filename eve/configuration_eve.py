"""EveConfig: the Llama text config plus the fields of the patch embedding layer (PEL), and presets."""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig

# OpenAI CLIP normalisation: the statistics of the official EVE image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompts, image tokens, padding), as in PyTorch's cross-entropy."""

# Vicuna-7B v1.5 (Llama-2 architecture) as the LLM of EVE-7B.
_VICUNA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_EVE_VISION = dict(
    vision_hidden_size=1024,
    vision_patch_size=14,
    vision_conv_stride=2,
    vision_num_heads=8,
)

# Presets are data: name -> EveConfig keyword arguments (docs/architecture.md gives the numbers).
PRESETS: dict[str, dict[str, Any]] = {
    # EVE-7B: long side 672 px -> 24 tokens; a square image is 1 + 24 * 25 = 601 LLM tokens.
    "eve-7b": {**_VICUNA_7B, **_EVE_VISION, "max_image_size": 672},
    # EVE-7B-HD: long side 1344 px -> 48 tokens; a square image is 1 + 48 * 49 = 2353 LLM tokens.
    # The short side is rounded to 56 px (not p*s = 28) so the 48-token grid pools 2x onto the teacher's.
    "eve-7b-hd": {**_VICUNA_7B, **_EVE_VISION, "max_image_size": 1344, "image_resize_multiple": 56},
    # A CPU demo size over the real 32000-token Llama vocabulary: a 64 px image is an 8 x 8 grid.
    "tiny": dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        vision_hidden_size=128,
        vision_num_heads=8,
        vision_patch_size=4,
        vision_conv_stride=2,
        max_image_size=64,
    ),
}


@strict
class EveConfig(LlamaConfig):
    """Configuration of an EVE model: a Llama decoder that reads images through a patch embedding layer."""

    model_type = "eve"

    vision_patch_size: int = 14
    """p: side of a conv patch in pixels (kernel = stride of the patch conv)."""
    vision_conv_stride: int = 2
    """s: side of the CA1 window in patches; one LLM image token per s x s patches (p*s px)."""
    vision_hidden_size: int = 1024
    """C: width of the PEL (conv channels, CA1/CA2 width); the projector maps C -> hidden_size."""
    vision_num_heads: int = 8
    """Heads of the CA1 and CA2 cross-attentions; must divide vision_hidden_size."""
    vision_attn_scale: str = "official"
    """CA1/CA2 logit scale: "official" = C^-0.5 (as the released EVE code), "head_dim" = (C/heads)^-0.5."""
    max_image_size: int = 672
    """Long side of an image in pixels after resizing (672 for EVE-7B, 1344 for EVE-7B-HD)."""
    image_resize_multiple: int | None = None
    """Px the short side is rounded up to (None = p*s); EVE-7B-HD uses 56 so its grid is always even."""
    mm_projector_type: str = "mlp2x_gelu"
    """Projector from the PEL to the LLM: "mlp2x_gelu" = Linear(C, D) -> GELU -> Linear(D, D)."""
    image_token_index: int = -200
    """Id that fills an image's run of 1 + h*(w+1) positions in input_ids (the LLaVA/EVE constant)."""
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    """Per-channel RGB mean used to normalise pixels in [0, 1] (OpenAI CLIP statistics)."""
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    """Per-channel RGB standard deviation used to normalise pixels in [0, 1]."""

    def validate_architecture(self) -> None:
        """Check the Llama fields and that the vision fields describe a buildable PEL."""
        super().validate_architecture()
        if self.vision_hidden_size % self.vision_num_heads != 0:
            raise ValueError(
                f"vision_hidden_size ({self.vision_hidden_size}) must be a multiple of vision_num_heads "
                f"({self.vision_num_heads})."
            )
        if self.vision_attn_scale not in ("official", "head_dim"):
            raise ValueError(
                f"vision_attn_scale must be 'official' or 'head_dim', got {self.vision_attn_scale!r}."
            )
        if self.mm_projector_type != "mlp2x_gelu":
            raise ValueError(f"mm_projector_type must be 'mlp2x_gelu', got {self.mm_projector_type!r}.")
        if self.max_image_size % (self.vision_patch_size * self.vision_conv_stride) != 0:
            raise ValueError(
                f"max_image_size ({self.max_image_size}) must be a multiple of patch*stride "
                f"({self.vision_patch_size * self.vision_conv_stride})."
            )
        if self.image_resize_multiple is not None and self.image_resize_multiple % self.image_token_stride:
            raise ValueError(
                f"image_resize_multiple ({self.image_resize_multiple}) must be a multiple of patch*stride "
                f"({self.image_token_stride})."
            )
        if self.image_token_index >= 0:
            raise ValueError(
                f"image_token_index must be negative (not a vocabulary id), got {self.image_token_index}."
            )

    @property
    def image_token_stride(self) -> int:
        """Pixels per LLM image token along each side (p * s)."""
        return self.vision_patch_size * self.vision_conv_stride

    def num_image_tokens(self, h: int, w: int) -> int:
        """LLM positions of an image with an (h, w) token grid: [CLS] + h rows of (w patches + [SPL])."""
        return 1 + h * (w + 1)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> EveConfig:
        """An EveConfig from the PRESETS table ("tiny", "eve-7b", "eve-7b-hd"), fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"Unknown EVE preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


AutoConfig.register("eve", EveConfig)
