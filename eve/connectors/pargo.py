"""ParGo's partial-global projector: masks, Q-Former-style layers, connector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eve.connectors.config import Connector, ConnectorConfig


def pargo_cross_mask(num_partial: int, num_global: int, num_patches: int, device: Any = None) -> Tensor:
    """(n_p + n_g, N) bool, True = may attend: partial query i sees patches [i*r, (i+1)*r), r = N / n_p;
    global queries see all patches."""
    block = num_patches // num_partial
    partial = (
        torch.arange(num_patches, device=device)[None, :] // block
        == torch.arange(num_partial, device=device)[:, None]
    )
    return torch.cat([partial, torch.ones(num_global, num_patches, dtype=torch.bool, device=device)])


def pargo_self_mask(num_partial: int, num_global: int, device: Any = None) -> Tensor:
    """(n_q, n_q) bool: block-diagonal, partial queries with partial ones, global with global."""
    is_global = torch.arange(num_partial + num_global, device=device) >= num_partial
    return is_global[:, None] == is_global[None, :]


def pargo_cascade_mask(num_partial: int, depth: int, num_layers: int, device: Any = None) -> Tensor:
    """(n_p, n_p) bool of the cascaded partial perception block before layer `depth` (1..d): partial
    token i sees the k*depth partial tokens nearest to it, itself included (k = n_p / d): the window
    [i - k*depth // 2, ...) of that length, shifted inside 0..n_p-1 at the ends (so ties go to the
    lower index). At depth d every partial token sees all of them."""
    size = num_partial // num_layers * depth
    i = torch.arange(num_partial, device=device)
    start = (i - size // 2).clamp(0, num_partial - size)  # (n_p,)
    offset = i[None, :] - start[:, None]  # (n_p, n_p): column j relative to row i's window start
    return (offset >= 0) & (offset < size)


class BertAttention(nn.Module):
    """A post-norm (BERT / Q-Former) attention sublayer: LayerNorm(x + Wo attention(Wq x, Wk c, Wv c))."""

    def __init__(self, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)  # BERT's epsilon

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, C) attends to context (B, S, C_kv) where mask (T, S) is True -> (B, T, C)."""

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, ., hd)

        out = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(context)), heads(self.v(context)), attn_mask=mask
        )
        return self.norm(x + self.o(out.transpose(1, 2).flatten(2)))


class PargoLayer(nn.Module):
    """One Q-Former layer of ParGo (post-norm, as BERT): masked self-attention, masked cross-attention
    to the patches, feed-forward (Linear - GELU - Linear, residual, LayerNorm)."""

    def __init__(self, dim: int, heads: int, ffn: int, kv_dim: int):
        super().__init__()
        self.self_attn = BertAttention(dim, heads, dim)
        self.cross_attn = BertAttention(dim, heads, kv_dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: Tensor, patches: Tensor, self_mask: Tensor, cross_mask: Tensor) -> Tensor:
        """x (B, n_q, C), patches (B, N, C_e) -> (B, n_q, C)."""
        x = self.cross_attn(self.self_attn(x, x, self_mask), patches, cross_mask)
        return self.ffn_norm(x + self.ffn(x))


class PargoConnector(Connector):
    """ParGo: n_p partial + n_g global learned queries over one encoder's N patches.

    Queries (+ learned absolute positions, LayerNorm, as BERT embeds them) run through d PargoLayers:
    self-attention block-diagonal (pargo_self_mask), cross-attention partial query i -> its own block of
    N / n_p patches, global -> all (pargo_cross_mask). Before layer l a cascaded partial perception
    block (a post-norm self-attention among the partial tokens, pargo_cascade_mask) lets partial token i
    see its k*l nearest partial tokens; global tokens pass it unchanged. A Linear maps to D.

    Faithful to the released model code: post-norm BERT layers (BERT-small), learned positions added
    to the queries, cross-attention in every layer, the two masks above. The released code holds no
    cascade block, so its form here (one masked post-norm attention sublayer) follows the paper's
    description; `pargo_cascade=False` gives the released layers alone. Dropout is left out.
    """

    def __init__(self, cfg: ConnectorConfig):
        super().__init__(cfg)
        dim, heads, n_q = cfg.pargo_width, cfg.pargo_heads, cfg.pargo_partial + cfg.pargo_global
        self.queries = nn.Parameter(torch.empty(n_q, dim))
        self.pos = nn.Parameter(torch.empty(n_q, dim))
        self.embed_norm = nn.LayerNorm(dim, eps=1e-12)
        depth = range(cfg.pargo_layers)
        self.cascade = (
            nn.ModuleList(BertAttention(dim, heads, dim) for _ in depth) if cfg.pargo_cascade else None
        )
        self.layers = nn.ModuleList(
            PargoLayer(dim, heads, cfg.pargo_ffn, cfg.encoder_widths[0]) for _ in depth
        )
        self.out = nn.Linear(dim, cfg.llm_hidden)
        self.init_weights()

    def init_weights(self) -> None:
        """BERT's init in the Q-Former: N(0, 0.02) weights and queries, zero biases; `out` keeps PyTorch's."""
        nn.init.normal_(self.queries, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        for module in [*(self.cascade or []), *self.layers]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def num_tokens(self, grids: Sequence[tuple[int, int]]) -> int:
        return self.cfg.pargo_partial + self.cfg.pargo_global

    def forward(self, features: list[list[Tensor]]) -> Tensor:
        """[[(B, N, C_e)]] -> (B, n_p + n_g, D)."""
        self.check(features)
        cfg, patches = self.cfg, features[0][0]
        n_p, n_g, dev = cfg.pargo_partial, cfg.pargo_global, patches.device
        self_mask, cross_mask = (
            pargo_self_mask(n_p, n_g, dev),
            pargo_cross_mask(n_p, n_g, patches.shape[1], dev),
        )
        x = self.embed_norm(self.queries + self.pos).to(patches.dtype).expand(patches.shape[0], -1, -1)
        for depth, layer in enumerate(self.layers, start=1):
            if self.cascade is not None:
                part = x[:, :n_p]
                part = self.cascade[depth - 1](
                    part, part, pargo_cascade_mask(n_p, depth, cfg.pargo_layers, dev)
                )
                x = torch.cat([part, x[:, n_p:]], dim=1)
            x = layer(x, patches, self_mask, cross_mask)
        return self.out(x)
