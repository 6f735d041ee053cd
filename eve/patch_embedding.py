"""The patch embedding layer (PEL) of EVE: conv, CA1 windows, CLS + CA2, SPL, mlp2x_gelu projector.

Images of any size and aspect ratio go through together as packed patches (no padded pixels, no
per-image Python loop): see DEVELOPERS.md "Pixels are packed patches" for the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eve.configuration_eve import EveConfig


def patchify(image: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Cut a (3, H, W) image into (P, 3*p*p) patches in window-major order (the model's pixel layout)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"patchify expects a (3, H, W) image tensor, got shape {tuple(image.shape)}.")
    p, s = patch_size, stride
    _, height, width = image.shape
    if height % (p * s) or width % (p * s) or height == 0 or width == 0:
        raise ValueError(
            f"Image of {height}x{width} px is not a positive multiple of patch*stride = {p * s} px on each side; "
            "resize it with EveImageProcessor first."
        )
    h, w = height // (p * s), width // (p * s)
    # (3, h, s, p, w, s, p): token row, patch row in window, pixel row; same for columns.
    x = image.reshape(3, h, s, p, w, s, p)
    # -> (h, w, s, s, 3, p, p): windows in raster order, patches in raster order inside a window,
    # each patch channel-first so that the conv is a matmul with conv.weight.view(C, 3*p*p).
    x = x.permute(1, 4, 2, 5, 0, 3, 6)
    return x.reshape(h * w * s * s, 3 * p * p)


def check_packed_pixels(
    pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, patch_dim: int, patch_size: int, conv_stride: int
) -> torch.Tensor:
    """image_grid_hw on the CPU (n, 2), after checking that pixel_values (P, 3*p*p) holds its s*s*h*w
    patches per image; a ValueError naming both shapes otherwise."""
    grid = image_grid_hw.detach().to("cpu", torch.long)
    expected = int((grid[:, 0] * grid[:, 1]).sum()) * conv_stride**2
    if pixel_values.ndim != 2 or pixel_values.shape != (expected, patch_dim):
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_hw {grid.tolist()} needs "
            f"({expected}, {patch_dim}): sum of s*s*h*w patches of 3*p*p values (p={patch_size}, "
            f"s={conv_stride}). Build both with EveImageProcessor."
        )
    return grid


@dataclass
class ImageLayout:
    """Index arithmetic that places every PEL output row of a batch of images, built once per batch."""

    patch_image: torch.Tensor
    """(N,) image number of each CA1 token (N = sum h*w), image by image, raster order."""
    cls_key_index: torch.Tensor
    """(n, K) rows of the CA1 tokens each image's CLS attends to (K = max h*w, padded by repeats)."""
    cls_key_mask: torch.Tensor
    """(n, K) True where cls_key_index is a real key of that image, False on the padding."""
    gather: torch.Tensor
    """(T,) for each output token, its row in cat([CLS (n), CA1 tokens (N), SPL (R = sum h)])."""
    is_patch: torch.Tensor
    """(T,) True at patch tokens of the output, False at CLS and SPL tokens."""

    @classmethod
    def build(cls, image_grid_hw: torch.Tensor, device: torch.device) -> ImageLayout:
        """Compute all indices on the CPU with vectorised ops (one small host copy of the grids)."""
        grid = image_grid_hw.detach().to("cpu", torch.long)
        n = grid.shape[0]
        h, w = grid[:, 0], grid[:, 1]
        n_patch = h * w  # (n,) CA1 tokens per image
        n_tok = 1 + h * (w + 1)  # (n,) output tokens per image
        images = torch.arange(n)

        # Where each image starts in the CA1 tokens, in the SPL rows and in the output.
        patch_start = torch.cumsum(n_patch, 0) - n_patch
        row_start = torch.cumsum(h, 0) - h
        tok_start = torch.cumsum(n_tok, 0) - n_tok
        n_patches, n_rows, n_tokens = int(n_patch.sum()), int(h.sum()), int(n_tok.sum())

        # CA1 token j of image i sits at grid cell (r, c) and output position start + 1 + r*(w+1) + c.
        patch_image = torch.repeat_interleave(images, n_patch)  # (N,)
        j = torch.arange(n_patches) - patch_start[patch_image]
        r, c = j // w[patch_image], j % w[patch_image]
        patch_dst = tok_start[patch_image] + 1 + r * (w[patch_image] + 1) + c
        # SPL of row r of image i closes the row: output position start + 1 + r*(w+1) + w.
        row_image = torch.repeat_interleave(images, h)  # (R,)
        row = torch.arange(n_rows) - row_start[row_image]
        spl_dst = tok_start[row_image] + 1 + row * (w[row_image] + 1) + w[row_image]
        # Source rows: [CLS_0..CLS_{n-1}, CA1 tokens, SPL rows]; invert "source -> destination".
        dst = torch.cat([tok_start, patch_dst, spl_dst])  # (T,), a permutation of arange(T)
        gather = torch.empty(n_tokens, dtype=torch.long)
        gather[dst] = torch.arange(n_tokens)
        is_patch = torch.zeros(n_tokens, dtype=torch.bool)
        is_patch[patch_dst] = True

        # CA2 keys: each CLS attends to its own image's CA1 tokens. We pad the key *indices* to the
        # largest image (K = max h*w) and mask: the padded part only touches the single-query
        # logits (n*K*C multiply-adds), while the kv projection runs on the N packed rows. A
        # segment softmax would avoid even that padding, but needs scatter atomics that are
        # non-deterministic on GPU; padding keeps plain batched ops and deterministic results.
        k_max = int(n_patch.max()) if n else 0
        slot = torch.arange(k_max)
        cls_key_mask = slot[None, :] < n_patch[:, None]  # (n, K)
        cls_key_index = patch_start[:, None] + torch.where(cls_key_mask, slot[None, :], 0)

        def to(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return cls(to(patch_image), to(cls_key_index), to(cls_key_mask), to(gather), to(is_patch))


class CrossAttention(nn.Module):
    """One query vector attends to a set of key vectors; output = query + Linear(attention)."""

    def __init__(self, dim: int, num_heads: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale
        self.q_norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_norm = nn.LayerNorm(dim)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)  # [k | v] along the output features
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        context: torch.Tensor,
        key_index: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (B, C) attends to context (B, K, C), or to packed context (M, C) rows key_index (B, K)."""
        b, dim = query.shape
        heads = self.num_heads
        q = self.q_proj(self.q_norm(query)).view(b, 1, heads, dim // heads)  # (B, 1, H, hd)
        kv = self.kv_proj(self.kv_norm(context))  # (B, K, 2C) or (M, 2C): only real rows projected
        if key_index is not None:
            kv = kv[key_index]  # (B, K, 2C)
        k, v = kv.view(b, -1, 2, heads, dim // heads).unbind(2)  # 2 x (B, K, H, hd)
        # K is tiny for CA1 (s*s = 4) and there is a single query: an elementwise product and a sum
        # over hd is cheaper than a batched matmul of 1 x hd by hd x 4 blocks.
        logits = (q * self.scale * k).sum(-1)  # (B, K, H)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, :, None], float("-inf"))
        attn = logits.softmax(dim=1)  # over the keys
        out = (attn[..., None] * v).sum(1)  # (B, H, hd)
        return query + self.out_proj(out.reshape(b, dim))


class Projector(nn.Module):
    """mlp2x_gelu: Linear(C, D) -> GELU -> Linear(D, D) on every image token."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, C) -> (T, D)."""
        return self.fc2(F.gelu(self.fc1(x)))


class EvePatchEmbedding(nn.Module):
    """Packed patches of many images -> their LLM token embeddings [CLS] row_1 [SPL] ... row_h [SPL]."""

    def __init__(self, config: EveConfig):
        super().__init__()
        dim = config.vision_hidden_size
        self.patch_size = config.vision_patch_size
        self.conv_stride = config.vision_conv_stride
        head_dim = dim // config.vision_num_heads
        # The official code scales logits by C^-0.5 (not head_dim^-0.5): keep it so that official
        # checkpoints reproduce exactly.
        scale = dim**-0.5 if config.vision_attn_scale == "official" else head_dim**-0.5
        self.conv = nn.Conv2d(3, dim, kernel_size=self.patch_size, stride=self.patch_size, bias=False)
        self.local_attention = CrossAttention(dim, config.vision_num_heads, scale)  # CA1
        self.global_attention = CrossAttention(dim, config.vision_num_heads, scale)  # CA2
        self.class_embedding = nn.Parameter(torch.empty(dim))  # CLS, one per image
        self.split_embedding = nn.Parameter(torch.empty(dim))  # SPL, closes every row
        self.projector = Projector(dim, config.hidden_size)

    run_rule = "1 + h*(w+1)"
    """num_image_tokens in words (for error messages)."""

    @staticmethod
    def num_image_tokens(h: int, w: int) -> int:
        """LLM positions of an (h, w) token grid: [CLS] + h rows of (w patches + [SPL])."""
        return 1 + h * (w + 1)

    def layout(self, image_grid_hw: torch.Tensor) -> ImageLayout:
        """The index arithmetic for a batch of (h, w) token grids, on this module's device."""
        return ImageLayout.build(image_grid_hw, self.conv.weight.device)

    def forward(
        self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, layout: ImageLayout | None = None
    ) -> torch.Tensor:
        """pixel_values (P, 3*p*p) of all images, image_grid_hw (n, 2) -> (sum 1 + h*(w+1), D)."""
        s2 = self.conv_stride**2
        weight = self.conv.weight  # (C, 3, p, p)
        dim = weight.shape[0]
        grid = check_packed_pixels(
            pixel_values, image_grid_hw, weight[0].numel(), self.patch_size, self.conv_stride
        )
        layout = layout if layout is not None else self.layout(image_grid_hw)
        # Conv2d(kernel = stride = p) over un-padded images == one matmul over all packed patches.
        patches = F.linear(pixel_values.to(weight.dtype), weight.flatten(1))  # (P, C)
        windows = patches.view(-1, s2, dim)  # (N, s*s, C): window-major packing
        pooled = windows.mean(dim=1)  # (N, C) = avg_pool(s x s) of each window
        local = self.local_attention(pooled, windows)  # (N, C), CA1: all windows of all images at once
        n_images = grid.shape[0]
        cls = self.class_embedding.expand(n_images, dim)  # (n, C)
        cls = self.global_attention(cls, local, layout.cls_key_index, layout.cls_key_mask)  # (n, C), CA2
        # The projector acts per token, so it commutes with the reordering; SPL is one vector, projected once.
        projected = self.projector(torch.cat([cls, local]))  # (n + N, D)
        n_rows = int(grid[:, 0].sum())
        spl = self.projector(self.split_embedding[None]).expand(n_rows, -1)  # (R, D)
        return torch.cat([projected, spl])[layout.gather]  # (T, D) in [CLS] row [SPL] ... order


class Eve2PatchEmbedding(nn.Module):
    """EVEv2's patch embedding: Conv(3, C, p, p) -> GELU -> Conv(C, D, s, s), then [CLS] row [SPL] ... .

    The same packed patches and token layout as EvePatchEmbedding (front-end "pel2"): both convs are
    matmuls over the packed rows, the second one over each window's s*s patches, so images of any size go
    through together without padding. No cross-attention and no separate projector: the second conv
    maps C to the LLM width D (named `projector`, the module that plays that role in the PEL).
    """

    run_rule = EvePatchEmbedding.run_rule
    num_image_tokens = staticmethod(EvePatchEmbedding.num_image_tokens)
    layout = EvePatchEmbedding.layout

    def __init__(self, config: EveConfig):
        super().__init__()
        dim, s = config.vision_hidden_size, config.vision_conv_stride
        self.patch_size, self.conv_stride = config.vision_patch_size, s
        self.conv = nn.Conv2d(3, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.projector = nn.Conv2d(dim, config.hidden_size, kernel_size=s, stride=s)
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))  # CLS, one per image
        self.split_embedding = nn.Parameter(torch.empty(config.hidden_size))  # SPL, closes every row

    def forward(
        self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, layout: ImageLayout | None = None
    ) -> torch.Tensor:
        """pixel_values (P, 3*p*p) of all images, image_grid_hw (n, 2) -> (sum 1 + h*(w+1), D)."""
        s2 = self.conv_stride**2
        weight = self.conv.weight  # (C, 3, p, p)
        grid = check_packed_pixels(
            pixel_values, image_grid_hw, weight[0].numel(), self.patch_size, self.conv_stride
        )
        layout = layout if layout is not None else self.layout(image_grid_hw)
        patches = F.gelu(F.linear(pixel_values.to(weight.dtype), weight.flatten(1), self.conv.bias))  # (P, C)
        # The second conv sees one window's s*s patches (raster order, window-major packing): its kernel
        # (D, C, s, s) flattened as (D, s, s, C) matches the window's rows (s*s, C) flattened.
        windows = patches.view(-1, s2 * weight.shape[0])  # (N, s*s*C)
        merge = self.projector.weight.permute(0, 2, 3, 1).flatten(1)  # (D, s*s*C)
        tokens = F.linear(windows, merge, self.projector.bias)  # (N, D)
        n_images, n_rows = grid.shape[0], int(grid[:, 0].sum())
        cls = self.class_embedding.expand(n_images, -1)  # (n, D)
        spl = self.split_embedding.expand(n_rows, -1)  # (R, D)
        return torch.cat([cls, tokens, spl])[layout.gather]  # (T, D) in [CLS] row [SPL] ... order
