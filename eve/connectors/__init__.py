"""Connectors of the encoder-based seed systems: vision encoder features -> LLM image tokens.

Every connector reads `features`: one list per vision encoder, holding the patch tokens of its tapped
layers, each (B, N_e, C_e) with N_e = h_e * w_e in raster order (CLS already dropped), and returns
(B, T, D) image tokens for the LLM. Variants are data: `CONNECTORS` names the modules,
`CONNECTOR_PRESETS` holds each paper's configuration, `build_connector(cfg)` builds one.

| name | from | image tokens (preset) |
|---|---|---|
| `mlp2x_gelu` | LLaVA-1.5: Linear - GELU - Linear per token | h*w (576) |
| `comm` | COMM: multi-level merge of CLIP (+ DINOv2 layers + MLP), concat, Linear | h*w (256) |
| `mof_interleaved` | Eyes-Wide-Shut MoF: own mlp2x_gelu per encoder, tokens alternate | 2*h*w (1152) |
| `mof_additive` | MoF: alpha * enc0 + (1 - alpha) * enc1 | h*w (576) |
| `sva` | Cambrian-1 Spatial Vision Aggregator: windowed cross-attention of a query grid | qh*qw (576) |
| `pargo` | ParGo: partial + global queries, Q-Former-style layers | n_p + n_g (304) |
"""

from __future__ import annotations

from typing import Any

from eve.connectors.comm import CommConnector, LayerMerge
from eve.connectors.config import COMM_MERGES, Connector, ConnectorConfig
from eve.connectors.mlp import MlpConnector, MofConnector
from eve.connectors.pargo import PargoConnector, pargo_cascade_mask, pargo_cross_mask, pargo_self_mask
from eve.connectors.sva import SvaConnector, sva_window_index

CONNECTORS: dict[str, type[Connector]] = {
    "mlp2x_gelu": MlpConnector,
    "comm": CommConnector,
    "mof_interleaved": MofConnector,
    "mof_additive": MofConnector,
    "sva": SvaConnector,
    "pargo": PargoConnector,
}
"""Connector name -> builder (the module class, called with the config)."""

_CLIP_L_336 = dict(encoder_widths=(1024,), encoder_grids=((24, 24),))  # CLIP ViT-L/14-336, layer -2
_VICUNA_7B = 4096

# Each paper's defaults, one row per preset; ConnectorConfig.from_preset(name, **overrides).
CONNECTOR_PRESETS: dict[str, dict[str, Any]] = {
    # LLaVA-1.5-7B: 576 tokens, 1024 -> 4096 -> 4096.
    "llava-1.5": dict(connector="mlp2x_gelu", llm_hidden=_VICUNA_7B, **_CLIP_L_336),
    # COMM: CLIP-L/14 (all 24 layers) + DINOv2-L/14 (its 6 deepest, our reading of "deep layers") at
    # 224 px (16 x 16), LLN-Layerscale, Vicuna-7B.
    "comm": dict(
        connector="comm",
        llm_hidden=_VICUNA_7B,
        encoder_widths=(1024, 1024),
        encoder_grids=((16, 16), (16, 16)),
        encoder_layers=(24, 6),
        comm_merge="lln_layerscale",
    ),
    # MoF (Eyes Wide Shut): CLIP-L/14-336 + DINOv2-L/14 at 24 x 24, LLaVA-1.5-7B; 1,152 tokens.
    "mof-interleaved": dict(
        connector="mof_interleaved",
        llm_hidden=_VICUNA_7B,
        encoder_widths=(1024, 1024),
        encoder_grids=((24, 24),) * 2,
    ),
    # Additive MoF at an even mix (one point of the paper's sweep).
    "mof-additive": dict(
        connector="mof_additive",
        llm_hidden=_VICUNA_7B,
        encoder_widths=(1024, 1024),
        encoder_grids=((24, 24),) * 2,
        mof_alpha=0.5,
    ),
    # Cambrian-1-8B: SigLIP-SO400M (1152), CLIP-L/14-336 (1024), DINOv2-g (1536) at 24 x 24 and
    # multi-stage CLIP-ConvNeXt-XXL (384+768+1536+3072 = 5760) at 96 x 96; Llama-3-8B (4096).
    "cambrian-1": dict(
        connector="sva",
        llm_hidden=4096,
        encoder_widths=(1152, 1024, 1536, 5760),
        encoder_grids=((24, 24), (24, 24), (24, 24), (96, 96)),
        sva_width=1024,
        sva_heads=16,
        sva_depth=3,
        sva_query_grid=(24, 24),
    ),
    # ParGo (released config): EVA-CLIP-L/14-336 (1024, 24 x 24), BERT-small Q-Former (4 layers of 512,
    # 8 heads, FFN 2048), 288 partial + 16 global queries, InternLM2-7B (4096).
    "pargo": dict(
        connector="pargo",
        llm_hidden=4096,
        encoder_widths=(1024,),
        encoder_grids=((24, 24),),
        pargo_partial=288,
        pargo_global=16,
        pargo_width=512,
        pargo_heads=8,
        pargo_ffn=2048,
        pargo_layers=4,
    ),
}


def build_connector(cfg: ConnectorConfig) -> Connector:
    """The connector module that `cfg` names."""
    return CONNECTORS[cfg.connector](cfg)


__all__ = [
    "COMM_MERGES",
    "CONNECTORS",
    "CONNECTOR_PRESETS",
    "ConnectorConfig",
    "Connector",
    "LayerMerge",
    "build_connector",
    "pargo_cascade_mask",
    "pargo_cross_mask",
    "pargo_self_mask",
    "sva_window_index",
]
