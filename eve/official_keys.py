"""Key layouts of the official baaivision/EVE checkpoints: official name (regex) -> EveForCausalLM name.

`LAYOUTS` maps each of our vision front-ends to the official layout that loads into it: EVE v1 (the PEL,
"pel") and EVEv2 (its conv stack and divide-and-conquer layers, "pel2"); `detect_layout` tells them apart.
eve/convert_official.py applies them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# The LLM's keys are already ours in both layouts (transformers' Llama / Qwen2 module names); listing the
# layer's modules (not `model.layers.*`) makes a leftover of another variant an unknown key.
_LLM_KEYS: list[tuple[str, str]] = [
    (r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight)$", r"\1"),
    (
        r"^(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|"
        r"(input|post_attention)_layernorm)\.(weight|bias))$",
        r"\1",
    ),
]
_ROPE_BUFFER = (r"\.rotary_emb\.inv_freq$", "RoPE frequencies (recomputed from the config)")

# EVE v1, official key (regex) -> ours. The official PEL (VisionTokenizer) builds q/kv as
# nn.Sequential(LayerNorm, Linear), so index 0 is the norm and 1 the projection.
EVE_KEY_MAP: list[tuple[str, str]] = [
    (r"^model\.vision_tower\.patch_embedding\.weight$", "vision_tower.conv.weight"),
    (r"^model\.vision_tower\.(class|split)_embedding$", r"vision_tower.\1_embedding"),
    (
        r"^model\.vision_tower\.(local|global)_attention\.q\.0\.(weight|bias)$",
        r"vision_tower.\1_attention.q_norm.\2",
    ),
    (
        r"^model\.vision_tower\.(local|global)_attention\.q\.1\.weight$",
        r"vision_tower.\1_attention.q_proj.weight",
    ),
    (
        r"^model\.vision_tower\.(local|global)_attention\.kv\.0\.(weight|bias)$",
        r"vision_tower.\1_attention.kv_norm.\2",
    ),
    (
        r"^model\.vision_tower\.(local|global)_attention\.kv\.1\.weight$",
        r"vision_tower.\1_attention.kv_proj.weight",
    ),
    (
        r"^model\.vision_tower\.(local|global)_attention\.proj\.(weight|bias)$",
        r"vision_tower.\1_attention.out_proj.\2",
    ),
    (r"^model\.mm_projector\.0\.(weight|bias)$", r"vision_tower.projector.fc1.\1"),
    (r"^model\.mm_projector\.2\.(weight|bias)$", r"vision_tower.projector.fc2.\1"),
    *_LLM_KEYS,
]
# Training-only or derived tensors of the official EVE v1 checkpoints that have no place in ours.
EVE_DROPPED: list[tuple[str, str]] = [
    (r"^model\.vision_clip\.", "the frozen CLIP teacher (training only; not part of an exported EVE)"),
    (r"^model\.vision_tower_compressor\.", "the patch aligning layer (training only; lives in train/)"),
    _ROPE_BUFFER,
]

# EVEv2. Its VisionTokenizer's patch_embedding is nn.Sequential(Conv2d(3, C, p, p), GELU, Conv2d(C, D, s, s)):
# index 1 (GELU) holds no weights. Its Qwen2 decoder layers (`add_moe`, `moe_part layernorm-self_attn-mlp`)
# hold the visual copies as `self_attn.moe_{q,k,v,o}_proj`, `moe_mlp` and `moe_{input,post_attention}
# _layernorm`; ours sit under the layer's `visual`. No mm_projector and no visual copy of the final norm.
EVE2_KEY_MAP: list[tuple[str, str]] = [
    (r"^model\.vision_tower\.patch_embedding\.0\.(weight|bias)$", r"vision_tower.conv.\1"),
    (r"^model\.vision_tower\.patch_embedding\.2\.(weight|bias)$", r"vision_tower.projector.\1"),
    (r"^model\.vision_tower\.(class|split)_embedding$", r"vision_tower.\1_embedding"),
    (r"^(model\.layers\.\d+)\.self_attn\.moe_([qkvo]_proj\.(weight|bias))$", r"\1.visual.\2"),
    (r"^(model\.layers\.\d+)\.moe_(mlp\.(gate|up|down)_proj\.weight)$", r"\1.visual.\2"),
    (r"^(model\.layers\.\d+)\.moe_((input|post_attention)_layernorm\.weight)$", r"\1.visual.\2"),
    *_LLM_KEYS,
]
EVE2_DROPPED: list[tuple[str, str]] = [_ROPE_BUFFER]


@dataclass(frozen=True)
class OfficialLayout:
    """One key layout of the official checkpoints: how its keys become ours, and its default preset."""

    name: str
    """How error messages and logs call it."""
    preset: str
    """The preset that gives the vision fields the weights do not hold."""
    key_map: list[tuple[str, str]]
    """Official key (regex) -> ours (re.sub template); the first match wins."""
    dropped: list[tuple[str, str]]
    """Official key (regex searched) -> why it has no place in ours."""


LAYOUTS: dict[str, OfficialLayout] = {
    "pel": OfficialLayout("EVE v1 (EVE-7B, EVE-7B-HD)", "eve-7b", EVE_KEY_MAP, EVE_DROPPED),
    "pel2": OfficialLayout("EVEv2 (EVE-7B-HD-v2.0)", "eve2-7b", EVE2_KEY_MAP, EVE2_DROPPED),
}
"""Our vision_frontend -> the official layout that loads into it."""


def detect_layout(keys: Iterable[str]) -> str:
    """Our front-end for these official keys: "pel2" for EVEv2's conv stack (`patch_embedding.0`), else "pel"."""
    return "pel2" if "model.vision_tower.patch_embedding.0.weight" in set(keys) else "pel"
