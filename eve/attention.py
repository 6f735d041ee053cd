"""The "sdpa_packed" attention backend: exact per-sample causal attention over packed rows, any device.

A packed row holds several samples (`attention_mask=None`, `position_ids` restarting at each sample).
transformers' "sdpa" turns that into a dense (B, 1, T, T) block-diagonal mask, and with any mask PyTorch
SDPA leaves its fused kernels for the masked math path: quadratic in the whole row, not the sample. Here
the mask interface returns a `PackedSegments` plan instead (the segments, found once per forward), and
the attention function gathers each segment into a right-padded batch and runs SDPA with `is_causal=True`
and no mask. Right padding + causal means a real query never sees a padded key, so the result is exact
for every real token. Anything that is not a packed row (padding masks, a KV cache, generation) goes to
transformers' own "sdpa" mask and attention, so the backend is a drop-in replacement for "sdpa".
Registered (through transformers' `AttentionInterface` / `AttentionMaskInterface`) on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

SDPA_PACKED = "sdpa_packed"


@dataclass(frozen=True)
class PackedSegments:
    """Where the samples of packed rows lie; passed to the attention function in place of a 4D mask."""

    gathers: tuple[torch.Tensor, ...]
    """One (S_b, L_b) index per length bucket into the flattened (B*T) tokens: segment s, position j is
    token start_s + j (clamped to the last token; slots past a segment's end are padding, never attended)."""
    inverse: torch.Tensor
    """(B*T,) slot of each token in the concatenation of the buckets' flattened (S_b*L_b) outputs."""


def find_segments(starts: torch.Tensor) -> PackedSegments:
    """The gather plan of a (B, T) bool tensor marking the first token of every segment (column 0 included)."""
    flat = starts.flatten()  # (N,) with N = B*T; rows end where the next begins, so flattening is safe
    n = flat.numel()
    first = torch.nonzero(flat).flatten()  # (S,) first token of each segment
    lengths = torch.diff(first, append=first.new_tensor([n]))  # (S,)
    segment = torch.cumsum(flat.long(), 0) - 1  # (N,) segment of each token
    offset = torch.arange(n, device=flat.device) - first[segment]  # (N,) position inside its segment
    # Pad each segment only to the longest of its power-of-two length bucket, not to the longest overall:
    # a 1000-token sample would otherwise make every 30-token one cost 1000^2 (one SDPA call per bucket).
    bucket = torch.ceil(torch.log2(lengths.double())).long()  # (S,)
    slot_base = torch.empty_like(first)  # (S,) first output slot of each segment
    gathers, used = [], 0
    for b in torch.unique(bucket).tolist():
        members = torch.nonzero(bucket == b).flatten()  # (S_b,)
        width = int(lengths[members].max())  # L_b
        steps = torch.arange(width, device=flat.device)
        gathers.append((first[members, None] + steps).clamp(max=n - 1))  # (S_b, L_b)
        slot_base[members] = used + torch.arange(members.numel(), device=flat.device) * width
        used += members.numel() * width
    return PackedSegments(gathers=tuple(gathers), inverse=slot_base[segment] + offset)


def sdpa_packed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> PackedSegments | torch.Tensor | None:
    """A PackedSegments plan for packed rows without a cache or padding mask; else transformers' sdpa mask."""
    defer = dict(mask_function=mask_function, attention_mask=attention_mask, use_vmap=use_vmap, device=device)
    # Only a pure (possibly packed) causal pattern over the whole input: no 2D padding mask, no cache
    # offset, no custom or/and overlay (those set use_vmap), at least two tokens.
    plain = (
        attention_mask is None
        and not use_vmap
        and isinstance(q_offset, int)
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length > 1
    )
    if plain:
        # Ask the mask itself whether token t may see token t-1: exactly where transformers' block-diagonal
        # mask breaks, so segments match it (O(B*T), never the (T, T) mask).
        rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
        t = torch.arange(1, q_length, device=device)[None, :]  # (1, T-1)
        sees_previous = mask_function(rows, torch.zeros_like(rows), t, t - 1).expand(batch_size, q_length - 1)
        if not bool(sees_previous.all()):
            starts = F.pad(~sees_previous, (1, 0), value=True)  # (B, T); every row starts a segment
            return find_segments(starts)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, **defer, **kwargs)


def sdpa_packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: PackedSegments | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA per packed segment (right-padded, no mask); transformers' sdpa for anything else."""
    if not isinstance(attention_mask, PackedSegments):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, length, head_dim = query.shape  # (B, H, T, d); key/value (B, H_kv, T, d)
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)  # (N, H, d)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)  # (N, H_kv, d)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], value.shape[-1])  # (N, H_kv, d_v)
    outputs = []
    for gather in attention_mask.gathers:  # one per length bucket (a handful), never one per sample
        out = F.scaled_dot_product_attention(
            q[gather].transpose(1, 2),  # (S_b, H, L_b, d)
            k[gather].transpose(1, 2),  # (S_b, H_kv, L_b, d)
            v[gather].transpose(1, 2),
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,  # no mask: SDPA keeps its fused kernels
            enable_gqa=heads != key.shape[1],  # GQA inside SDPA, no repeated K/V copies
        )  # (S_b, H, L_b, d_v)
        outputs.append(out.transpose(1, 2).reshape(-1, heads, out.shape[-1]))  # (S_b*L_b, H, d_v)
    out = torch.cat(outputs)[attention_mask.inverse]  # (N, H, d_v): padded slots dropped
    return out.view(batch, length, heads, -1), None  # (B, T, H, d_v), the layout sdpa returns


def register_packed_attention() -> None:
    """Register "sdpa_packed" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(SDPA_PACKED, sdpa_packed_attention_forward)
    AttentionMaskInterface.register(SDPA_PACKED, sdpa_packed_mask)


register_packed_attention()
