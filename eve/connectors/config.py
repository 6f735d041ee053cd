"""ConnectorConfig (the settings of every connector) and Connector, the base class that checks inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

COMM_MERGES = ("lln_layerscale", "layerscale", "mean", "mean_top_half")


@dataclass(frozen=True)
class ConnectorConfig:
    """Which connector, the encoders it reads, and every connector's settings (unused ones are ignored)."""

    connector: str
    """Name in CONNECTORS: mlp2x_gelu, comm, mof_interleaved, mof_additive, sva or pargo."""
    llm_hidden: int
    """D: width of the LLM's token embeddings, the width of the output tokens."""
    encoder_widths: tuple[int, ...]
    """C_e: feature width of each vision encoder, in the order of `features`."""
    encoder_grids: tuple[tuple[int, int], ...]
    """(h_e, w_e): patch grid of each encoder; its N_e = h_e * w_e tokens come in raster order."""
    encoder_layers: tuple[int, ...] = ()
    """Tapped layers per encoder (len(features[e])); () = one each. Only COMM reads more than one."""
    comm_merge: str = "lln_layerscale"
    """COMM's merge of an encoder's layers: lln_layerscale (the paper's choice), layerscale, mean or
    mean_top_half (see LayerMerge)."""
    mof_alpha: float = 0.5
    """Additive MoF: tokens = alpha * enc0 + (1 - alpha) * enc1 (the paper sweeps this ratio)."""
    sva_width: int = 1024
    """SVA: width of the queries and of every encoder's projected features."""
    sva_heads: int = 16
    """SVA: attention heads; must divide sva_width."""
    sva_depth: int = 3
    """SVA: stacked aggregator layers before the LLM."""
    sva_query_grid: tuple[int, int] = (24, 24)
    """SVA: (qh, qw) query grid; every encoder grid must be a whole multiple of it (its windows)."""
    sva_context: str = "all"
    """SVA global context: "all" = mean of every encoder's mean token, "first" = the first encoder's only
    (what the released Cambrian code computes)."""
    pargo_partial: int = 288
    """ParGo: n_p partial queries; each sees its own contiguous block of N / n_p patches."""
    pargo_global: int = 16
    """ParGo: n_g global queries; each sees all patches."""
    pargo_width: int = 512
    """ParGo: width of the Q-Former layers (the released model starts from BERT-small: 512)."""
    pargo_heads: int = 8
    """ParGo: attention heads of every attention; must divide pargo_width."""
    pargo_ffn: int = 2048
    """ParGo: hidden width of the feed-forward block."""
    pargo_layers: int = 4
    """ParGo: d, the number of Q-Former layers (cross-attention in every layer, as released)."""
    pargo_cascade: bool = True
    """ParGo: a cascaded partial perception block before every layer (n_p must be a multiple of d)."""

    def __post_init__(self) -> None:
        """Store sequences as tuples (YAML gives lists) and check that the connector is buildable."""
        n = len(self.encoder_widths)
        set_ = object.__setattr__  # the dataclass is frozen
        set_(self, "encoder_widths", tuple(self.encoder_widths))
        set_(self, "encoder_grids", tuple(tuple(g) for g in self.encoder_grids))
        set_(self, "encoder_layers", tuple(self.encoder_layers) or (1,) * n)
        set_(self, "sva_query_grid", tuple(self.sva_query_grid))
        from eve.connectors import CONNECTORS  # the table imports this module

        if self.connector not in CONNECTORS:
            raise ValueError(f"Unknown connector {self.connector!r}; choose one of {sorted(CONNECTORS)}.")
        lo, hi = CONNECTORS[self.connector].encoders
        if (
            n < lo
            or (hi is not None and n > hi)
            or len(self.encoder_grids) != n
            or len(self.encoder_layers) != n
        ):
            raise ValueError(
                f"{self.connector} reads {lo}..{hi or 'any'} encoders, one width, grid and layer count each; "
                f"got widths {self.encoder_widths}, grids {self.encoder_grids}, layers {self.encoder_layers}."
            )
        if self.connector != "comm" and set(self.encoder_layers) != {1}:
            raise ValueError(f"{self.connector} reads one layer per encoder, got {self.encoder_layers}.")
        if self.connector in ("comm", "mof_interleaved", "mof_additive") and len(set(self.encoder_grids)) > 1:
            raise ValueError(f"{self.connector} pairs tokens one to one: grids {self.encoder_grids} differ.")
        if self.comm_merge not in COMM_MERGES:
            raise ValueError(f"comm_merge must be one of {COMM_MERGES}, got {self.comm_merge!r}.")
        if self.connector == "sva":
            qh, qw = self.sva_query_grid
            for e, (h, w) in enumerate(self.encoder_grids):
                if h % qh or w % qw:
                    raise ValueError(
                        f"SVA: encoder {e} grid {h}x{w} is not a whole multiple of the query grid {qh}x{qw}; "
                        "interpolate its features to a multiple or change sva_query_grid."
                    )
            if self.sva_width % self.sva_heads or self.sva_context not in ("all", "first"):
                raise ValueError("SVA: sva_heads must divide sva_width; sva_context is 'all' or 'first'.")
        if self.connector == "pargo":
            (h, w), n_p = self.encoder_grids[0], self.pargo_partial
            if (h * w) % n_p or (self.pargo_cascade and n_p % self.pargo_layers):
                raise ValueError(
                    f"ParGo: {h * w} patches must split into {n_p} equal blocks, and (with the cascade) "
                    f"{n_p} partial queries into {self.pargo_layers} layers' steps."
                )
            if self.pargo_width % self.pargo_heads:
                raise ValueError("ParGo: pargo_heads must divide pargo_width.")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ConnectorConfig:
        """A config from CONNECTOR_PRESETS, fields overridden by keyword."""
        from eve.connectors import CONNECTOR_PRESETS

        if name not in CONNECTOR_PRESETS:
            raise ValueError(f"Unknown connector preset {name!r}; choose one of {sorted(CONNECTOR_PRESETS)}.")
        return cls(**{**CONNECTOR_PRESETS[name], **overrides})


class Connector(nn.Module):
    """Base of every connector: keeps the config, checks `features` against it."""

    encoders: tuple[int, int | None] = (1, 1)
    """Fewest and most encoders the connector reads (None: any number)."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.cfg = cfg

    def num_tokens(self, grids: Sequence[tuple[int, int]]) -> int:
        """Image tokens per image for these encoder grids."""
        raise NotImplementedError

    def check(self, features: list[list[Tensor]]) -> None:
        """Raise a ValueError naming the encoder and layer whose features do not match the config."""
        cfg = self.cfg
        if len(features) != len(cfg.encoder_widths):
            raise ValueError(
                f"{cfg.connector} expects {len(cfg.encoder_widths)} encoders, got {len(features)}."
            )
        batch = features[0][0].shape[0]
        for e, layers in enumerate(features):
            (h, w), width = cfg.encoder_grids[e], cfg.encoder_widths[e]
            if len(layers) != cfg.encoder_layers[e]:
                raise ValueError(
                    f"Encoder {e}: expected {cfg.encoder_layers[e]} tapped layers, got {len(layers)}."
                )
            for i, x in enumerate(layers):
                if tuple(x.shape) != (batch, h * w, width):
                    raise ValueError(
                        f"Encoder {e} layer {i}: features of shape {tuple(x.shape)}, expected "
                        f"({batch}, {h * w}, {width}) for its {h}x{w} grid (CLS dropped)."
                    )
