"""PEL forward+backward on 16 images of mixed aspect ratios: batched packed path vs per-image loops.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_pel.py [--dim 1024 --llm-dim 4096 --max-image-size 672]

Three ways over the same weights, checked to give the same output first:
- batched: EvePatchEmbedding on the packed patches of all images (one call).
- loop: the same module called once per image (a straightforward per-image loop).
- official: the released EVE approach: every image pasted on a square canvas, one conv over the
  canvases (padded pixels included), then crop, CA1, CA2, SPL and projector image by image.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torch.nn.functional as F

from eve import EveConfig, EvePatchEmbedding
from eve.patch_embedding import patchify

logger = logging.getLogger("bench_pel")

# (height, width) in tokens at long side 24 (672 px for EVE-7B), scaled to --max-image-size.
ASPECTS = [(24, 24), (24, 12), (12, 24), (24, 18), (18, 24), (24, 6), (6, 24), (24, 16)]
ASPECTS += [(16, 24), (24, 20), (20, 24), (24, 9), (9, 24), (24, 14), (14, 24), (24, 3)]


def official_attention(attn, query: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """Official-style cross-attention: query (Q, C) over keys (Q, K, C), elementwise like the release."""
    q_len, dim = query.shape
    q = attn.q_proj(attn.q_norm(query)).reshape(q_len, 1, heads, -1)
    kv = attn.kv_proj(attn.kv_norm(keys)).reshape(q_len, keys.shape[1], 2, heads, -1)
    weights = (q * attn.scale * kv[:, :, 0]).sum(-1).softmax(dim=1)  # (Q, K, H)
    out = (weights[..., None] * kv[:, :, 1]).sum(1)  # (Q, H, hd)
    return query + attn.out_proj(out.reshape(q_len, dim))


def official_forward(
    pel: EvePatchEmbedding, canvases: torch.Tensor, grids: list[tuple[int, int]], heads: int
):
    """Padded square canvases -> one conv -> per-image crop / CA1 / CA2 / SPL / projector (a Python loop)."""
    p, s = pel.patch_size, pel.conv_stride
    features = F.conv2d(canvases, pel.conv.weight, stride=p)  # (B, C, S/p, S/p): padded pixels too
    outputs = []
    for i, (h, w) in enumerate(grids):
        f = features[i, :, : h * s, : w * s]  # (C, H, W) crop of the valid patches
        dim = f.shape[0]
        pooled = F.avg_pool2d(f[None], s)[0].flatten(1).T  # (h*w, C)
        windows = (
            f.unfold(1, s, s).unfold(2, s, s).reshape(dim, h * w, s * s).permute(1, 2, 0)
        )  # (hw, s*s, C)
        local = official_attention(pel.local_attention, pooled, windows, heads)  # (hw, C)
        cls = official_attention(
            pel.global_attention, pel.class_embedding[None], local[None], heads
        )  # (1, C)
        rows = torch.cat([local.view(h, w, dim), pel.split_embedding.expand(h, 1, dim)], dim=1)  # (h, w+1, C)
        outputs.append(pel.projector(torch.cat([cls, rows.reshape(-1, dim)])))
    return torch.cat(outputs)


def timed(fn, params, iters: int) -> float:
    """Median wall time in ms of forward + backward."""
    times = []
    for _ in range(iters + 1):  # the first run warms up
        for param in params:
            param.grad = None
        start = time.perf_counter()
        fn().float().square().mean().backward()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    """Build 16 mixed-aspect images, check the three paths agree, print their times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="eve-7b", help="EveConfig preset for the PEL geometry")
    parser.add_argument("--dim", type=int, help="PEL width C (default: the preset's)")
    parser.add_argument("--llm-dim", type=int, help="LLM width D (default: the preset's)")
    parser.add_argument("--max-image-size", type=int, help="long side in px (default: the preset's)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    overrides = dict(
        vision_hidden_size=args.dim, max_image_size=args.max_image_size, hidden_size=args.llm_dim
    )
    config = EveConfig.from_preset(args.preset, **{k: v for k, v in overrides.items() if v is not None})
    args.dim, args.llm_dim, args.max_image_size = (
        config.vision_hidden_size,
        config.hidden_size,
        config.max_image_size,
    )
    p, s = config.vision_patch_size, config.vision_conv_stride
    long_tokens = args.max_image_size // (p * s)
    grids = [(max(1, h * long_tokens // 24), max(1, w * long_tokens // 24)) for h, w in ASPECTS]
    torch.manual_seed(0)
    pel = EvePatchEmbedding(config).to(args.device)
    for param in pel.parameters():  # O(1) activations, so that the agreement check is meaningful
        torch.nn.init.normal_(param, std=param[0].numel() ** -0.5 if param.ndim > 1 else 0.5)
    images = [torch.randn(3, h * p * s, w * p * s, device=args.device) for h, w in grids]
    pixel_values = torch.cat([patchify(im, p, s) for im in images])
    image_grid_hw = torch.tensor(grids)
    canvases = torch.zeros(len(images), 3, args.max_image_size, args.max_image_size, device=args.device)
    for canvas, image in zip(canvases, images):
        canvas[:, : image.shape[1], : image.shape[2]] = image  # official: paste (it centres; same cost)
    singles = [(patchify(im, p, s), torch.tensor([g])) for im, g in zip(images, grids)]

    paths = {
        "batched": lambda: pel(pixel_values, image_grid_hw),
        "loop": lambda: torch.cat([pel(px, g) for px, g in singles]),
        "official": lambda: official_forward(pel, canvases, grids, config.vision_num_heads),
    }
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)
    with torch.no_grad(), autocast:
        ref = paths["batched"]().float()
        for name in ("loop", "official"):
            err = (paths[name]().float() - ref).abs().max().item()
            logger.info("%-8s max |diff| vs batched: %.2e (values ~%.2f)", name, err, ref.abs().mean().item())

    n_tokens, n_valid = ref.shape[0], sum(h * w for h, w in grids)
    logger.info(
        "16 images, grids %s; C=%d, D=%d, long side %d px, %s, device %s, %d threads",
        grids, args.dim, args.llm_dim, args.max_image_size, "bf16" if args.bf16 else "fp32",
        args.device, torch.get_num_threads(),
    )  # fmt: skip
    logger.info(
        "%d LLM tokens; valid patches %d of %d canvas patches (%.0f%%)",
        n_tokens, 4 * n_valid, len(grids) * (2 * long_tokens) ** 2, 100 * n_valid / (len(grids) * long_tokens**2),
    )  # fmt: skip
    params = list(pel.parameters())
    results = {}
    for name, fn in paths.items():
        with autocast:
            results[name] = timed(fn, params, args.iters)
    for name, ms in results.items():
        logger.info("%-8s fwd+bwd %9.1f ms   speedup of batched: %.2fx", name, ms, ms / results["batched"])


if __name__ == "__main__":
    main()
