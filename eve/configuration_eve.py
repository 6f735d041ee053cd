"""EveConfig: the text config of the LLM (a Llama or Qwen2 backbone) plus the fields of the vision front-end
(the patch embedding layer, PEL, EVEv2's PEL, or pretrained encoders + a connector), the EVEv2
divide-and-conquer split of the decoder layers, and presets."""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig

# OpenAI CLIP normalisation: the statistics of the official EVE image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""timm's ImageNet normalisation (efficientnet-lite0, the embedded teacher and encoder)."""

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
# The tiny CPU LLM: 4 Llama layers of width 256 over the 32000-token vocabulary.
_TINY_LLM = dict(
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
)
# Qwen2.5-7B-Instruct as the LLM of EVEv2-7B (Qwen2 architecture: q/k/v biases, GQA 28/4, RoPE theta 1e6).
_QWEN25_7B = dict(
    backbone="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    pad_token_id=151643,
    bos_token_id=151643,
    eos_token_id=151645,
    tie_word_embeddings=False,
)
# The tiny CPU LLM with a Qwen2 backbone over the same 32000-token vocabulary (the embedded Llama tokenizer):
# q/k/v biases, GQA (4 query heads, 2 KV heads), Qwen2's RoPE theta and RMSNorm eps.
_TINY_QWEN2 = dict(
    _TINY_LLM,
    backbone="qwen2",
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
# EVEv2: its patch embedding (one token per 32 x 32 px) and a visual copy of every layer's norms, attention
# projections and MLP (the official `moe_part layernorm-self_attn-mlp`); images sized by area (`max_size`).
_EVE2_VISION = dict(
    vision_frontend="pel2",
    vision_hidden_size=1024,
    vision_patch_size=16,
    vision_conv_stride=2,
    image_resize_mode="area",
    modality_split=["layernorm", "self_attn", "mlp"],
)
# Encoders of the encoder presets (EncoderSpec fields, eve/encoders.py); "/path/to/..." are placeholders.
_CLIP_L_336 = dict(kind="hf_clip", path="/path/to/clip-vit-large-patch14-336", layers=[-2], image_size=336)
_DINOV2_L = dict(kind="hf_dinov2", path="/path/to/dinov2-large", layers=[-2], image_size=336)
_LITE0_S16 = dict(kind="timm", name="efficientnet_lite0", path=None, layers=[-2], image_size=128)


def _encoders(connector: dict[str, Any], *encoders: dict[str, Any]) -> dict[str, Any]:
    """The EveConfig fields of an encoder front-end."""
    return dict(
        vision_frontend="encoders",
        vision_encoders=[dict(e) for e in encoders],
        vision_connector=dict(connector),
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
        **_TINY_LLM,
        vision_hidden_size=128,
        vision_num_heads=8,
        vision_patch_size=4,
        vision_conv_stride=2,
        max_image_size=64,
    ),
    # EVEv2-7B on Qwen2.5-7B-Instruct: sqrt(H*W) = 800 px (stages 0 and 1.0; 1600 from stage 1.1 on), so a
    # square image is a 25 x 25 grid, 1 + 25 * 26 = 651 tokens. The vision fields are the official ones.
    "eve2-7b": {**_QWEN25_7B, **_EVE2_VISION, "max_image_size": 800},
    # EVE-7B-HD-v2.0: the same model trained and released at sqrt(H*W) up to 1600 px.
    "eve2-7b-hd": {**_QWEN25_7B, **_EVE2_VISION, "max_image_size": 1600},
    # The tiny LLM on a Qwen2 backbone, with EVE's PEL and shared layers (the "tiny" preset otherwise).
    "tiny-qwen2": dict(
        **_TINY_QWEN2,
        vision_hidden_size=128,
        vision_num_heads=8,
        vision_patch_size=4,
        vision_conv_stride=2,
        max_image_size=64,
    ),
    # EVEv2 at CPU size: tiny Qwen2, EVEv2's patch embedding (4-px patches, 2 x 2 merge: 8 px per token),
    # sqrt(H*W) = 64 px (a square image is 8 x 8, 73 tokens), every layer split into text and visual parts.
    "tiny-eve2": {
        **_TINY_QWEN2,
        **_EVE2_VISION,
        "vision_hidden_size": 128,
        "vision_patch_size": 4,
        "max_image_size": 64,
    },
    # Encoder front-ends (eve/vision_frontends.py) on Vicuna-7B v1.5; encoders are taken by path.
    # LLaVA-1.5-7B: CLIP ViT-L/14-336, penultimate layer, CLS dropped, mlp2x_gelu: 576 tokens.
    "llava-1.5-7b": {**_VICUNA_7B, **_encoders({"connector": "mlp2x_gelu"}, _CLIP_L_336)},
    # MoF (Eyes Wide Shut), interleaved: CLIP-L/14-336 and DINOv2-L/14 (both 24 x 24 at 336 px, layer -2
    # as LLaVA selects), each through its own mlp2x_gelu, tokens alternating: 1152 tokens.
    "mof-interleaved-7b": {
        **_VICUNA_7B,
        **_encoders({"connector": "mof_interleaved"}, _CLIP_L_336, _DINOV2_L),
    },
    # COMM: every CLIP-L/14-336 block (hidden_states 1..24) and the 6 deepest DINOv2-L/14 blocks (19..24),
    # LLN-Layerscale merges, DINOv2 MLP, concat, Linear: 576 tokens. The paper runs both at 224 px; these
    # are the 336-px CLIP checkpoint's native size (set image_size 224 on both for the paper's 256 tokens).
    "comm-7b": {
        **_VICUNA_7B,
        **_encoders(
            {"connector": "comm", "comm_merge": "lln_layerscale"},
            {**_CLIP_L_336, "layers": list(range(1, 25))},
            {**_DINOV2_L, "layers": list(range(19, 25))},
        ),
    },
    # Cambrian-style Spatial Vision Aggregator: a 24 x 24 query grid (width 1024, 16 heads, 3 layers) over
    # CLIP-L/14-336 (24 x 24: 1 x 1 windows) and DINOv2-L/14 at 672 px (48 x 48: 2 x 2 windows): 576 tokens.
    # Cambrian-1 reads four encoders (SigLIP, CLIP, DINOv2, ConvNeXt) on Llama-3-8B; SigLIP's 27 x 27
    # grid is no multiple of 24, so this keeps the two encoders of the rows above, one at high resolution.
    "cambrian-sva-7b": {
        **_VICUNA_7B,
        **_encoders(
            {
                "connector": "sva",
                "sva_width": 1024,
                "sva_heads": 16,
                "sva_depth": 3,
                "sva_query_grid": [24, 24],
            },
            _CLIP_L_336,
            {**_DINOV2_L, "image_size": 672},
        ),
    },
    # CPU size of the LLaVA recipe: the tiny LLM and the embedded efficientnet-lite0 (real ImageNet
    # weights, the demo's aligning teacher) at 128 px, its stride-16 map (8 x 8 x 112), mlp2x_gelu: 64 tokens.
    "tiny-encoders": {**_TINY_LLM, **_encoders({"connector": "mlp2x_gelu"}, _LITE0_S16)},
    # Two encoders on CPU (MoF interleaved: 128 tokens). The second encoder is the same efficientnet-lite0
    # tapped at another stage: its stride-32 map at 256 px (8 x 8 x 320). It has real weights and sees the
    # image deeper and at twice the resolution on the same 8 x 8 grid, so the connectors that pair tokens
    # cell by cell (MoF, COMM's shape rule, SVA windows) apply. A tiny random HF ViT would be a frozen
    # encoder of noise: it tests the plumbing (tests/eve/test_frontends.py does) but gives nothing to learn.
    "tiny-encoders-mof": {
        **_TINY_LLM,
        **_encoders(
            {"connector": "mof_interleaved"}, _LITE0_S16, {**_LITE0_S16, "layers": [-1], "image_size": 256}
        ),
    },
}


@strict
class EveConfig(LlamaConfig):
    """Configuration of an EVE model: a Llama or Qwen2 decoder that reads images through a vision front-end.

    The text fields are LlamaConfig's (the two backbones share them); `backbone` picks the decoder and
    `layer_types` / `sliding_window` are the Qwen2 fields its decoder reads (Qwen2.5 uses no window).
    """

    model_type = "eve"

    backbone: str = "llama"
    """Decoder architecture (eve/backbones.py): "llama" (Llama/Vicuna, EVE v1) or "qwen2" (q/k/v biases, no
    o_proj bias, EVEv2's Qwen2.5); GQA and RoPE come from num_key_value_heads and rope_parameters."""
    layer_types: list[str] | None = None
    """Qwen2 only: "full_attention" or "sliding_attention" per layer; None = full attention everywhere."""
    sliding_window: int | None = None
    """Qwen2 only: window of the "sliding_attention" layers in tokens (None when no layer slides)."""
    modality_split: list[str] = field(default_factory=list)
    """EVEv2 divide-and-conquer (eve/modality_layers.py; the official `moe_part`): parts of every decoder
    layer that get a visual copy, run by image tokens only: any of "layernorm" (both RMSNorms), "self_attn"
    (q/k/v/o projections; attention itself stays joint), "mlp". Empty = every weight shared (EVE v1)."""
    image_resize_mode: str = "long_side"
    """How images are sized (EveImageProcessor): "long_side" = the long side becomes max_image_size (EVE v1),
    "area" = sqrt(H*W) becomes max_image_size, each side rounded up to p*s (EVEv2's `max_size`)."""

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
    vision_frontend: str = "pel"
    """How images reach the LLM (eve/vision_frontends.py): "pel" = the patch embedding layer (the vision_*,
    image_* and max_image_size fields above), "encoders" = vision_encoders + vision_connector."""
    vision_encoders: list[dict[str, Any]] = field(default_factory=list)
    """Encoder front-end: one EncoderSpec per encoder (kind, path, name, layers, image_size, ...; see
    eve/encoders.py); building the model stores each one resolved (HF vision config included)."""
    vision_connector: dict[str, Any] = field(default_factory=dict)
    """Encoder front-end: ConnectorConfig fields (eve/connectors), "connector" naming it, except those the
    encoders and the LLM give (llm_hidden, encoder_widths, encoder_grids, encoder_layers)."""

    def __post_init__(self, **kwargs):
        if self.backbone == "qwen2" and self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers  # what Qwen2Model reads
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Check the text fields and that the vision fields describe a buildable front-end."""
        super().validate_architecture()
        self._validate_backbone()
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
        if self.vision_frontend not in ("pel", "pel2", "encoders"):
            raise ValueError(
                f"vision_frontend must be 'pel', 'pel2' or 'encoders', got {self.vision_frontend!r}."
            )
        if self.image_resize_mode not in ("long_side", "area"):
            raise ValueError(
                f"image_resize_mode must be 'long_side' or 'area', got {self.image_resize_mode!r}."
            )
        if self.vision_frontend == "encoders":
            self._validate_encoders()

    def _validate_backbone(self) -> None:
        """Check the backbone name, its Qwen2-only fields and the modality split."""
        if self.backbone not in ("llama", "qwen2"):
            raise ValueError(f"backbone must be 'llama' or 'qwen2', got {self.backbone!r}.")
        if self.backbone == "llama" and (self.layer_types is not None or self.sliding_window is not None):
            raise ValueError(
                "layer_types and sliding_window are Qwen2 fields: set backbone 'qwen2' or drop them."
            )
        if self.backbone == "qwen2":
            kinds = set(self.layer_types or [])
            if len(self.layer_types or []) != self.num_hidden_layers or kinds - {
                "full_attention",
                "sliding_attention",
            }:
                raise ValueError(
                    f"layer_types needs one 'full_attention' or 'sliding_attention' per layer "
                    f"({self.num_hidden_layers}), got {self.layer_types}."
                )
            if "sliding_attention" in kinds and not self.sliding_window:
                raise ValueError("layer_types has sliding_attention layers: set sliding_window (tokens).")
        unknown = set(self.modality_split) - {"layernorm", "self_attn", "mlp"}
        if unknown:
            raise ValueError(
                f"modality_split takes 'layernorm', 'self_attn' and 'mlp', got unknown {sorted(unknown)}."
            )

    def _validate_encoders(self) -> None:
        """Check the encoder specs and the connector keys (shapes are checked when the front-end is built)."""
        from eve.connectors import ConnectorConfig
        from eve.encoders import EncoderSpec
        from eve.vision_frontends import CONNECTOR_DERIVED

        if not self.vision_encoders:
            raise ValueError("vision_frontend 'encoders' needs at least one entry in vision_encoders.")
        spec_fields = set(EncoderSpec.__dataclass_fields__)
        for i, entry in enumerate(self.vision_encoders):
            unknown = set(entry) - spec_fields
            if unknown:
                raise ValueError(
                    f"vision_encoders[{i}]: unknown keys {sorted(unknown)}; known: {sorted(spec_fields)}."
                )
            EncoderSpec(**entry)
        allowed = set(ConnectorConfig.__dataclass_fields__) - set(CONNECTOR_DERIVED)
        unknown = set(self.vision_connector) - allowed
        if unknown or "connector" not in self.vision_connector:
            raise ValueError(
                f"vision_connector needs 'connector' and takes only {sorted(allowed)}; got "
                f"{sorted(self.vision_connector)} (the encoders and the LLM give {list(CONNECTOR_DERIVED)})."
            )

    @property
    def image_token_stride(self) -> int:
        """Pixels per LLM image token along each side (p * s)."""
        return self.vision_patch_size * self.vision_conv_stride

    def num_image_tokens(self, h: int, w: int) -> int:
        """LLM positions of an image with an (h, w) grid: for the PEL [CLS] + h rows of (w patches + [SPL]),
        for an encoder front-end (grid (1, T)) its T connector tokens."""
        from eve.vision_frontends import FRONTENDS

        return FRONTENDS[self.vision_frontend].num_image_tokens(h, w)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> EveConfig:
        """An EveConfig from the PRESETS table ("tiny", "eve-7b", "tiny-eve2", ...), fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"Unknown EVE preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


AutoConfig.register("eve", EveConfig)
