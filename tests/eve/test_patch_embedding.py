"""The PEL against a straightforward per-image reference (real Conv2d, explicit windows, Python loops)."""

import math

import pytest
import torch
import torch.nn.functional as F

from eve import EveConfig, EvePatchEmbedding
from eve.patch_embedding import patchify

# fp32 throughout, activations O(1) (see make_pel). The batched path sums in other orders than the
# reference (one matmul vs a conv, mean vs avg_pool, padded masked softmax vs a per-image softmax):
# differences are rounding only (7e-7 measured), so 1e-5 leaves a 10x margin while any indexing
# mistake (wrong window, row, CLS or SPL) moves values by O(0.1).
ATOL, RTOL = 1e-5, 1e-5


def resized_grid(height: int, width: int, long_side: int, multiple: int) -> tuple[int, int]:
    """Independent resize arithmetic: long side -> long_side, short side rounded up to `multiple` (>= 1 cell)."""
    if height >= width:
        return long_side // multiple, max(1, math.ceil(long_side * width / height / multiple))
    return max(1, math.ceil(long_side * height / width / multiple)), long_side // multiple


def reference_attention(attn, query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """One query (C,) over keys (K, C), written from the official formulas: q = Linear(LN(x)), [k|v] = Linear(LN)."""
    dim = query.shape[0]
    heads = attn.num_heads
    q = F.linear(F.layer_norm(query, (dim,), attn.q_norm.weight, attn.q_norm.bias), attn.q_proj.weight)
    kv = F.linear(F.layer_norm(keys, (dim,), attn.kv_norm.weight, attn.kv_norm.bias), attn.kv_proj.weight)
    k, v = kv[:, :dim], kv[:, dim:]  # official: kv.reshape(..., 2, heads, hd)
    out = []
    for head in range(heads):
        sl = slice(head * dim // heads, (head + 1) * dim // heads)
        weights = torch.softmax((k[:, sl] @ q[sl]) * scale, dim=0)  # (K,)
        out.append(weights @ v[:, sl])
    return query + attn.out_proj(torch.cat(out))


def reference_pel(pel: EvePatchEmbedding, image: torch.Tensor, config: EveConfig) -> torch.Tensor:
    """One (3, H, W) image -> (1 + h*(w+1), D) with nn.Conv2d and explicit loops over windows and rows."""
    s = config.vision_conv_stride
    dim = config.vision_hidden_size
    scale = dim**-0.5 if config.vision_attn_scale == "official" else (dim // config.vision_num_heads) ** -0.5
    conv = torch.nn.Conv2d(3, dim, config.vision_patch_size, config.vision_patch_size, bias=False)
    conv.weight.data.copy_(pel.conv.weight.data)
    grid = conv(image[None])[0]  # (C, H/p, W/p)
    h, w = grid.shape[1] // s, grid.shape[2] // s
    local = {}
    for r in range(h):
        for c in range(w):
            window = grid[:, r * s : (r + 1) * s, c * s : (c + 1) * s].reshape(dim, -1).T  # (s*s, C) raster
            pooled = F.avg_pool2d(grid[None, :, r * s : (r + 1) * s, c * s : (c + 1) * s], s)[0, :, 0, 0]
            local[r, c] = reference_attention(pel.local_attention, pooled, window, scale)
    all_local = torch.stack([local[r, c] for r in range(h) for c in range(w)])
    cls = reference_attention(pel.global_attention, pel.class_embedding, all_local, scale)
    rows = [cls]
    for r in range(h):
        rows += [local[r, c] for c in range(w)] + [pel.split_embedding]
    return pel.projector(torch.stack(rows))


def make_pel(config: EveConfig, seed: int = 0) -> EvePatchEmbedding:
    """A PEL with every parameter random (LayerNorms too), so that no term can hide behind a 1 or a 0."""
    torch.manual_seed(seed)
    pel = EvePatchEmbedding(config)
    for param in pel.parameters():
        # Matrices at 1/sqrt(fan_in) keep activations O(1) through the layers (so that an absolute
        # tolerance means the same thing everywhere); vectors at std 0.5 around 0.
        std = param[0].numel() ** -0.5 if param.ndim > 1 else 0.5
        torch.nn.init.normal_(param, std=std)
    return pel


def pack(images: list[torch.Tensor], config: EveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values, image_grid_hw) as the processor packs them."""
    p, s = config.vision_patch_size, config.vision_conv_stride
    pixels = torch.cat([patchify(im, p, s) for im in images])
    grid = torch.tensor([[im.shape[1] // (p * s), im.shape[2] // (p * s)] for im in images])
    return pixels, grid


# (H, W) in pixels for the tiny config (p*s = 8): tall, wide, square, single row/column, 1x1.
SIZES = [(32, 16), (8, 32), (24, 24), (8, 8), (32, 8), (16, 40)]


def test_patchify_is_window_major_channel_first(tiny_config):
    """Patch k of window (r, c) = pixels of grid cell (s*r + k//s, s*c + k%s), flattened (3, p, p)."""
    p, s = 2, 2
    image = torch.randn(3, 8, 12)
    patches = patchify(image, p, s)
    h, w = 8 // (p * s), 12 // (p * s)
    assert patches.shape == (h * w * s * s, 3 * p * p)
    row = 0
    for r in range(h):
        for c in range(w):
            for k in range(s * s):
                gy, gx = s * r + k // s, s * c + k % s
                expected = image[:, gy * p : (gy + 1) * p, gx * p : (gx + 1) * p].reshape(-1)
                assert torch.equal(patches[row], expected)
                row += 1
    with pytest.raises(ValueError, match="multiple of patch"):
        patchify(torch.zeros(3, 10, 8), p, s)


@pytest.mark.parametrize("scale", ["official", "head_dim"])
def test_batched_pel_matches_per_image_reference(tiny_config, scale):
    """Mixed sizes in one call == the per-image conv/window/row reference, image by image."""
    tiny_config.vision_attn_scale = scale
    pel = make_pel(tiny_config)
    torch.manual_seed(1)
    images = [torch.randn(3, hh, ww) for hh, ww in SIZES]
    pixels, grid = pack(images, tiny_config)
    with torch.no_grad():
        out = pel(pixels, grid)
        expected = torch.cat([reference_pel(pel, im, tiny_config) for im in images])
    assert out.shape == (
        sum(tiny_config.num_image_tokens(h, w) for h, w in grid.tolist()),
        tiny_config.hidden_size,
    )
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_attention_scale_option_changes_the_output(tiny_config):
    """The two scales are distinct settings (C^-0.5 vs head_dim^-0.5), not aliases."""
    pixels, grid = pack([torch.randn(3, 16, 16)], tiny_config)
    official = make_pel(tiny_config)(pixels, grid)
    tiny_config.vision_attn_scale = "head_dim"
    assert not torch.allclose(official, make_pel(tiny_config)(pixels, grid), atol=1e-3)


def test_batch_of_mixed_sizes_equals_each_image_alone(tiny_config):
    """Batching never mixes images: each image's rows equal a call with that image alone."""
    pel = make_pel(tiny_config)
    torch.manual_seed(2)
    images = [torch.randn(3, hh, ww) for hh, ww in SIZES]
    with torch.no_grad():
        batched = pel(*pack(images, tiny_config))
        alone = torch.cat([pel(*pack([im], tiny_config)) for im in images])
    # Same ops on the same rows; only the matmul blocking over a different row count differs: a few
    # fp32 ulp of O(1) values (7e-7 measured), far below the O(0.1) of any mixed-up row.
    torch.testing.assert_close(batched, alone, atol=5e-6, rtol=5e-6)


@pytest.mark.parametrize("height,width", [(100, 37), (37, 100), (672, 672), (1, 1000), (1000, 1)])
def test_token_count_for_odd_sizes_at_eve_7b_geometry(height, width):
    """p=14, s=2, long side 672: grid from the resize rule, PEL rows == 1 + h*(w+1)."""
    config = EveConfig.from_preset("tiny", vision_patch_size=14, max_image_size=672, vision_hidden_size=16)
    config.vision_num_heads = 2
    h, w = resized_grid(height, width, 672, 28)
    assert max(h, w) == 24 and min(h, w) >= 1  # 1x1000 -> one row of 24 tokens, not zero
    pel = make_pel(config)
    image = torch.randn(3, h * 28, w * 28)
    with torch.no_grad():
        out = pel(*pack([image], config))
    assert out.shape[0] == config.num_image_tokens(h, w) == 1 + h * (w + 1)
    if (height, width) == (672, 672):
        assert out.shape[0] == 601


def test_shape_mismatch_between_pixels_and_grid_raises(tiny_config):
    """pixel_values that do not hold the grids' patches give a clear error."""
    pel = make_pel(tiny_config)
    pixels, _ = pack([torch.randn(3, 16, 16)], tiny_config)
    with pytest.raises(ValueError, match="image_grid_hw"):
        pel(pixels, torch.tensor([[2, 3]]))


def test_gradients_reach_every_parameter(tiny_config):
    """Backward through the index arithmetic reaches conv, CA1, CA2, CLS, SPL and the projector."""
    pel = make_pel(tiny_config)
    pixels, grid = pack([torch.randn(3, hh, ww) for hh, ww in SIZES[:3]], tiny_config)
    pel(pixels, grid).square().mean().backward()
    for name, param in pel.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
