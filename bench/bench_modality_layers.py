"""EVEv2's divide-and-conquer layers: routed (each token through its own branch) vs the dense official mix.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_modality_layers.py [--hidden 1024 --layers 4 --tokens 2048]

The official code runs the text and the visual copy of every split module on every token and mixes
them with the image mask, `raw(x) * (1 - m) + visual(x) * m`; ours gathers each modality's rows and
runs each branch on its own rows (`eve/modality_layers.py`). Both run here on the same Qwen2-shaped
decoder stack (every part split: norms, q/k/v/o, MLP) and the same packed batch, at several shares of
image tokens. The two are first checked to give the same output; then forward + backward are timed
interleaved (median of --reps) and the FLOPs of one forward are counted by torch's FlopCounterMode.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from eve import EveConfig, EveForCausalLM
from eve.modality_layers import ModalityDecoderLayer, ModalityRouting


class Mixed(torch.nn.Module):
    """The official formulation of one split module: both branches on every token, mixed by the mask."""

    def __init__(self, text: torch.nn.Module, visual: torch.nn.Module, mask: torch.Tensor):
        super().__init__()
        self.text, self.visual, self.mask = text, visual, mask  # mask: (B, T, 1), 1 at image tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(x.dtype)
        return self.text(x) * (1 - m) + self.visual(x) * m


@contextlib.contextmanager
def dense_layers(image_mask: torch.Tensor):
    """Inside, every ModalityDecoderLayer run without routing mixes both branches on all tokens."""
    text_modules = ModalityDecoderLayer.text_modules
    mask = image_mask[..., None]

    def mixed(self):
        text = text_modules(self)
        return {
            n: Mixed(m, self.visual.get_submodule(n), mask) if hasattr(self.visual, n) else m
            for n, m in text.items()
        }

    ModalityDecoderLayer.text_modules = mixed
    try:
        yield
    finally:
        ModalityDecoderLayer.text_modules = text_modules


def packed_batch(tokens: int, image_share: float, sample_len: int, hidden: int, seed: int = 0):
    """One packed row of `tokens` positions: samples of `sample_len` whose leading share are image tokens."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(tokens) % sample_len
    image_mask = positions < round(image_share * sample_len)
    x = torch.randn(1, tokens, hidden, generator=g)
    return x, positions[None], image_mask[None]


def run(decoder, x, position_ids, routing, backward: bool) -> torch.Tensor:
    x = x.detach().requires_grad_(backward)
    out = decoder(inputs_embeds=x, position_ids=position_ids, modality_routing=routing).last_hidden_state
    if backward:
        out.float().square().mean().backward()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="packed positions per batch")
    parser.add_argument("--sample-len", type=int, default=512, help="positions per packed sample")
    parser.add_argument("--shares", default="0.5,0.9", help="image-token shares to measure")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    torch.manual_seed(0)

    config = EveConfig.from_preset(
        "tiny-eve2",
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        modality_split=["layernorm", "self_attn", "mlp"],
    )
    model = EveForCausalLM(config)
    model.set_attn_implementation("sdpa_packed")
    decoder = model.model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    print(
        f"Qwen2-shaped stack: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
        f"{args.heads}/{args.kv_heads} heads; {args.tokens} packed positions in samples of {args.sample_len}; "
        f"{args.dtype} autocast, {torch.get_num_threads()} threads"
    )
    print(
        "| image tokens | routed tok/s | dense tok/s | speed-up | routed GFLOP | dense GFLOP | FLOP ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for share in (float(s) for s in args.shares.split(",")):
        x, position_ids, image_mask = packed_batch(args.tokens, share, args.sample_len, args.hidden)
        routing = ModalityRouting.from_mask(image_mask)
        with torch.no_grad(), autocast:
            routed_out = run(decoder, x, position_ids, routing, backward=False)
            with dense_layers(image_mask):
                dense_out = run(decoder, x, position_ids, None, backward=False)
        diff = (routed_out.float() - dense_out.float()).abs().max().item()
        scale = dense_out.float().abs().max().item()
        assert diff <= 2e-2 * scale, f"routed and dense differ by {diff} (scale {scale})"
        flops = {}
        variants = {
            "routed": (contextlib.nullcontext, routing),
            "dense": (lambda mask=image_mask: dense_layers(mask), None),
        }
        for name, (ctx, route) in variants.items():
            with ctx(), torch.no_grad(), autocast, FlopCounterMode(display=False) as counter:
                run(decoder, x, position_ids, route, backward=False)
            flops[name] = counter.get_total_flops()
        times = {"routed": [], "dense": []}
        for rep in range(args.reps + 1):  # the first round warms up
            for name, (ctx, route) in variants.items():
                decoder.zero_grad(set_to_none=True)
                start = time.perf_counter()
                with ctx(), autocast:
                    run(decoder, x, position_ids, route, backward=True)
                if rep:
                    times[name].append(time.perf_counter() - start)
        routed_t, dense_t = (statistics.median(times[k]) for k in ("routed", "dense"))
        print(
            f"| {share:.0%} | {args.tokens / routed_t:,.0f} | {args.tokens / dense_t:,.0f} | "
            f"{dense_t / routed_t:.2f}x | {flops['routed'] / 1e9:.1f} | {flops['dense'] / 1e9:.1f} | "
            f"{flops['dense'] / flops['routed']:.2f}x |"
        )


if __name__ == "__main__":
    main()
