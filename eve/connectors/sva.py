"""Cambrian-1's Spatial Vision Aggregator (SVA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eve.connectors.config import Connector, ConnectorConfig
from eve.patch_embedding import Projector  # mlp2x_gelu


def sva_window_index(grid: tuple[int, int], query_grid: tuple[int, int], device: Any = None) -> Tensor:
    """(Q, sh*sw) raster positions of an (h, w) encoder grid that each query (i, j) of a (qh, qw) grid
    sees: its own sh x sw window (sh = h // qh, sw = w // qw), raster order inside the window."""
    (h, w), (qh, qw) = grid, query_grid
    if h % qh or w % qw:
        raise ValueError(f"SVA: grid {h}x{w} is not a whole multiple of the query grid {qh}x{qw}.")
    sh, sw = h // qh, w // qw
    i, a = torch.arange(qh, device=device), torch.arange(sh, device=device)
    j, b = torch.arange(qw, device=device), torch.arange(sw, device=device)
    rows = i[:, None, None, None] * sh + a[None, None, :, None]  # (qh, 1, sh, 1): row i*sh + a
    cols = j[None, :, None, None] * sw + b[None, None, None, :]  # (1, qw, 1, sw): column j*sw + b
    return (rows * w + cols).reshape(qh * qw, sh * sw)


class SvaLayer(nn.Module):
    """One aggregator layer, as Cambrian releases it (no biases inside the layer):
    x = Linear([q, Linear(context)]); x = x + Attn(LN-Linear(x), per-encoder LN-Linear keys/values of the
    query's windows, + a learned position per window slot where a window is larger than 1x1);
    out = q + MLP(LayerNorm(x))."""

    def __init__(self, dim: int, heads: int, windows: list[int]):
        super().__init__()
        self.heads = heads
        self.context_proj = nn.Linear(dim, dim, bias=False)
        self.in_proj = nn.Linear(2 * dim, dim, bias=False)
        self.q_norm, self.q_proj = nn.LayerNorm(dim), nn.Linear(dim, dim, bias=False)
        self.k_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in windows)
        self.k_projs = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in windows)
        self.v_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in windows)
        self.v_projs = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in windows)
        # One position per slot of the window, shared by all windows of that encoder.
        self.pos = nn.ParameterDict(
            {str(e): nn.Parameter(torch.empty(s, dim)) for e, s in enumerate(windows) if s > 1}
        )
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.GELU(), nn.Linear(dim, dim, bias=False))

    def forward(self, queries: Tensor, context: Tensor, windows: list[Tensor]) -> Tensor:
        """queries (B, Q, C), context (B, C), windows[e] (B*Q, S_e, C) -> (B, Q, C)."""
        b, q_len, dim = queries.shape
        ctx = self.context_proj(context)[:, None].expand(-1, q_len, -1)  # (B, Q, C)
        x = self.in_proj(torch.cat([queries, ctx], dim=-1)).reshape(b * q_len, dim)  # (M, C), M = B*Q
        keys, values = [], []
        for e, kv in enumerate(windows):
            if str(e) in self.pos:
                kv = kv + self.pos[str(e)].to(kv.dtype)  # (M, S_e, C)
            keys.append(self.k_projs[e](self.k_norms[e](kv)))
            values.append(self.v_projs[e](self.v_norms[e](kv)))
        hd = dim // self.heads
        q = self.q_proj(self.q_norm(x)).view(-1, self.heads, 1, hd)  # (M, H, 1, hd)
        k = torch.cat(keys, 1).unflatten(-1, (self.heads, hd)).transpose(1, 2)  # (M, H, S, hd), S = sum S_e
        v = torch.cat(values, 1).unflatten(-1, (self.heads, hd)).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v)  # (M, H, 1, hd): each query over its windows only
        x = x + self.o_proj(attn.reshape(-1, dim))
        return queries + self.mlp(self.norm(x)).view(b, q_len, dim)


class SvaConnector(Connector):
    """Cambrian-1's Spatial Vision Aggregator.

    Each encoder's features go through its own Linear - GELU - Linear - LayerNorm to the width C; a
    learned (qh*qw, C) query grid plus a global context (see sva_context) runs through sva_depth
    SvaLayers, query (i, j) attending only to window (i, j) of every encoder (all encoders' keys
    concatenated); then mlp2x_gelu to D. The windows are gathered once, so attention is (B*Q) small
    problems of sum_e S_e keys, never a dense (Q, sum_e N_e) mask. Every grid position has its own
    query (the paper's L x L x C grid); the released code learns one vector repeated over the grid.
    """

    encoders = (1, None)

    def __init__(self, cfg: ConnectorConfig):
        super().__init__(cfg)
        dim, (qh, qw) = cfg.sva_width, cfg.sva_query_grid
        windows = [(h // qh) * (w // qw) for h, w in cfg.encoder_grids]
        self.encoder_projs = nn.ModuleList(
            nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim))
            for width in cfg.encoder_widths
        )
        self.queries = nn.Parameter(torch.empty(qh * qw, dim))
        self.layers = nn.ModuleList(SvaLayer(dim, cfg.sva_heads, windows) for _ in range(cfg.sva_depth))
        self.out = Projector(dim, cfg.llm_hidden)
        self.init_weights()

    def init_weights(self) -> None:
        """Queries N(0, 1/D) and window positions N(0, 1), as released; Linear/LayerNorm keep PyTorch's."""
        nn.init.normal_(self.queries, std=self.cfg.llm_hidden**-0.5)
        for layer in self.layers:
            for pos in layer.pos.values():
                nn.init.normal_(pos)

    def num_tokens(self, grids: Sequence[tuple[int, int]]) -> int:
        return self.cfg.sva_query_grid[0] * self.cfg.sva_query_grid[1]

    def forward(self, features: list[list[Tensor]]) -> Tensor:
        """[[(B, N_e, C_e)] per encoder] -> (B, qh*qw, D)."""
        self.check(features)
        feats = [proj(layers[0]) for proj, layers in zip(self.encoder_projs, features)]  # (B, N_e, C) each
        if self.cfg.sva_context == "all":
            context = torch.stack([f.mean(1) for f in feats]).mean(0)  # (B, C)
        else:
            context = feats[0].mean(1)
        windows = []
        for f, grid in zip(feats, self.cfg.encoder_grids):
            # The windows tile the grid, so the gather copies each token once: the K/V projections
            # inside the layers cost the same as on the ungathered features.
            index = sva_window_index(grid, self.cfg.sva_query_grid, f.device)  # (Q, S_e)
            windows.append(f[:, index].flatten(0, 1))  # (B, Q, S_e, C) -> (B*Q, S_e, C)
        x = self.queries.to(feats[0].dtype).expand(feats[0].shape[0], -1, -1)  # (B, Q, C)
        for layer in self.layers:
            x = layer(x, context, windows)
        return self.out(x)
