"""LLaVA-1.5's mlp2x_gelu projector and the Mixture-of-Features connectors built from two of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from eve.connectors.config import Connector, ConnectorConfig
from eve.patch_embedding import Projector  # mlp2x_gelu: Linear(C, D) -> GELU -> Linear(D, D)


class MlpConnector(Connector):
    """LLaVA-1.5: mlp2x_gelu on every patch token of one encoder layer (CLIP-L/14-336, 24x24 = 576)."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__(cfg)
        self.proj = Projector(cfg.encoder_widths[0], cfg.llm_hidden)

    def num_tokens(self, grids: Sequence[tuple[int, int]]) -> int:
        return grids[0][0] * grids[0][1]

    def forward(self, features: list[list[Tensor]]) -> Tensor:
        """[[(B, N, C)]] -> (B, N, D)."""
        self.check(features)
        return self.proj(features[0][0])


class MofConnector(Connector):
    """Mixture of Features: each of two encoders through its own mlp2x_gelu, then interleaved token by
    token (out[:, 0::2] = enc0, out[:, 1::2] = enc1) or mixed as alpha * enc0 + (1 - alpha) * enc1."""

    encoders = (2, 2)

    def __init__(self, cfg: ConnectorConfig):
        super().__init__(cfg)
        self.projs = nn.ModuleList(Projector(width, cfg.llm_hidden) for width in cfg.encoder_widths)
        self.interleaved = cfg.connector == "mof_interleaved"

    def num_tokens(self, grids: Sequence[tuple[int, int]]) -> int:
        return grids[0][0] * grids[0][1] * (2 if self.interleaved else 1)

    def forward(self, features: list[list[Tensor]]) -> Tensor:
        """[[(B, N, C_0)], [(B, N, C_1)]] -> (B, 2N, D) interleaved or (B, N, D) additive."""
        self.check(features)
        a, b = (proj(layers[0]) for proj, layers in zip(self.projs, features))  # 2 x (B, N, D)
        if self.interleaved:
            return torch.stack([a, b], dim=2).flatten(1, 2)  # (B, N, 2, D) -> (B, 2N, D): a0 b0 a1 b1 ...
        return self.cfg.mof_alpha * a + (1 - self.cfg.mof_alpha) * b
