"""COMM's multi-level feature merging (CLIP layers + DINOv2 deep layers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from eve.connectors.config import COMM_MERGES, Connector, ConnectorConfig
from eve.patch_embedding import Projector  # Linear - GELU - Linear


class LayerMerge(nn.Module):
    """COMM's merge of one encoder's tapped layers z_1..z_L (each (B, N, C)) into one (B, N, C) map.

    mean: mean of all; mean_top_half: mean of the deeper half z_{L//2+1}..z_L; layerscale: sum of
    w_i z_i with learned w = softmax(logits), so the weights stay positive and sum to 1; lln_layerscale:
    the same sum over LayerNorm(Linear_i(z_i)), one Linear + LayerNorm per layer. Logits start at 0
    (equal weights).
    """

    def __init__(self, merge: str, num_layers: int, width: int):
        super().__init__()
        if merge not in COMM_MERGES:
            raise ValueError(f"merge must be one of {COMM_MERGES}, got {merge!r}.")
        self.merge = merge
        if merge == "lln_layerscale":
            self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(num_layers))
            self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(num_layers))
        if merge in ("lln_layerscale", "layerscale"):
            self.logits = nn.Parameter(torch.zeros(num_layers))

    def forward(self, layers: list[Tensor]) -> Tensor:
        """L x (B, N, C) -> (B, N, C)."""
        if self.merge == "mean":
            return torch.stack(layers).mean(0)
        if self.merge == "mean_top_half":
            return torch.stack(layers[len(layers) // 2 :]).mean(0)
        if self.merge == "lln_layerscale":
            layers = [norm(linear(z)) for z, linear, norm in zip(layers, self.linears, self.norms)]
        weights = self.logits.softmax(0).to(layers[0].dtype)  # (L,), sums to 1
        return torch.einsum("l,lbnc->bnc", weights, torch.stack(layers))


class CommConnector(Connector):
    """COMM: encoder 0 (CLIP) all tapped layers merged; encoder 1 (DINOv2, optional) its deep layers
    merged then an MLP (Linear - GELU - Linear, width kept); concatenated along channels; Linear to D."""

    encoders = (1, 2)

    def __init__(self, cfg: ConnectorConfig):
        super().__init__(cfg)
        widths = cfg.encoder_widths
        self.merges = nn.ModuleList(
            LayerMerge(cfg.comm_merge, n, width) for n, width in zip(cfg.encoder_layers, widths)
        )
        self.dino_mlp = Projector(widths[1], widths[1]) if len(widths) == 2 else None
        self.out = nn.Linear(sum(widths), cfg.llm_hidden)

    def num_tokens(self, grids: Sequence[tuple[int, int]]) -> int:
        return grids[0][0] * grids[0][1]

    def forward(self, features: list[list[Tensor]]) -> Tensor:
        """[[L_0 x (B, N, C_0)], [L_1 x (B, N, C_1)]] -> (B, N, D)."""
        self.check(features)
        merged = [merge(layers) for merge, layers in zip(self.merges, features)]
        if self.dino_mlp is not None:
            merged[1] = self.dino_mlp(merged[1])
        return self.out(torch.cat(merged, dim=-1))  # (B, N, C_0 + C_1) -> (B, N, D)
