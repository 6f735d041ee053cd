"""Packed vs padded batches on a mixed-length SFT-like set: non-pad token fraction and tokens/s.

Tiny EVE (tests/conftest.py sizes, 4 layers), forward + backward on CPU. Lengths follow a
LLaVA-665K-like mix: short VQA answers, long conversations, text-only samples. The same samples,
in the same order, are batched (a) padded, in shuffled order (what a plain trainer does), (b) padded
with length bucketing, (c) packed into rows of max_length with a fixed token budget, under transformers'
"sdpa" (a dense block-diagonal mask: SDPA's masked math path over whole rows) and under "sdpa_packed"
(eve/attention.py: causal SDPA per sample, no mask), whose rows' padded tails are computed too, and
(d) the same rows end to end in one row per micro-batch (`Collator(one_row=True)`, what the trainer
does under sdpa_packed): no padded tail. Padded batches carry a 2D mask, for which both backends run
the same transformers sdpa code. A second, stage-2-like set of ~97-token captions does the same.
"""

import logging
import os
import time

import numpy as np
import torch

from train.packing import Collator, plan_batches

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("bench_packing")


def make_samples(n: int, rng: np.random.Generator, kind: str = "sft") -> list[dict]:
    """Synthetic encoded samples. "sft": text lengths from a long-tailed mix (LLaVA-665K-like, 24-1000
    tokens, half supervised); "captions": stage-2-like, ~97 tokens (the demo's 73 image positions + a
    caption), the caption supervised."""
    samples = []
    for _ in range(n):
        if kind == "sft":
            length = int(np.clip(rng.lognormal(5.0, 0.8), 24, 1000))
            context = length // 2
        else:
            length = int(np.clip(rng.normal(97, 8), 80, 130))
            context = 75
        ids = rng.integers(3, 32000, size=length).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * context + ids[context:]})
    return samples


def run(model, batches, collator, samples) -> tuple[float, float]:
    """(real-token fraction of the computed positions, real tokens/s) over all batches, fwd + bwd."""
    real, total, t0 = 0, 0, time.perf_counter()
    for rows in batches:
        batch = collator([[samples[i] for i in r] for r in rows])
        real += sum(len(samples[i]["input_ids"]) for r in rows for i in r)
        total += batch["input_ids"].numel()
        out = model(**batch)
        out.loss.backward()
    dt = time.perf_counter() - t0
    return real / total, real / dt


def bench_set(model, kind: str, samples: list[dict], rng: np.random.Generator) -> None:
    """All batchings of one sample set, timed in interleaved rounds (best round each)."""
    lengths = [len(s["input_ids"]) for s in samples]
    # Samples per micro-batch as the trainer counts them (train.micro_batch_size), rows of 2,048.
    size = 16 if kind == "sft" else 32
    shuffled = list(range(len(samples)))
    rng.shuffle(shuffled)
    packed_plan = plan_batches(lengths, max_length=2048, packing=True, batch_size=size)
    runs = {  # name -> (batches, collator, attn_implementation)
        "padded (shuffled, 4/batch)": (
            [[[i] for i in shuffled[k : k + 4]] for k in range(0, len(samples), 4)],
            Collator(packing=False),
            "sdpa",
        ),
        "padded (length-bucketed)": (
            plan_batches(lengths, max_length=2048, packing=False, batch_size=size),
            Collator(packing=False),
            "sdpa",
        ),
        "packed rows, sdpa (dense block mask)": (packed_plan, Collator(packing=True), "sdpa"),
        "packed rows + pad tails, sdpa_packed": (packed_plan, Collator(packing=True), "sdpa_packed"),
        "packed, one row per batch, sdpa_packed": (
            packed_plan,
            Collator(packing=True, one_row=True),
            "sdpa_packed",
        ),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(2):  # interleaved rounds: the host's load hits every batching alike
        for name, (batches, collator, attn) in runs.items():
            model.set_attn_implementation(attn)
            results[name].append(run(model, batches, collator, samples))
    best = {name: max(r, key=lambda x: x[1]) for name, r in results.items()}
    log.info("== %s set: %d samples, %d tokens, %d per micro-batch", kind, len(samples), sum(lengths), size)
    for name, (frac, tps) in best.items():
        log.info("%-42s real tokens %.3f of computed  %8.0f tokens/s", name, frac, tps)
    one_row = best["packed, one row per batch, sdpa_packed"]
    log.info(
        "one row vs packed rows with pad tails (both sdpa_packed): %.2fx tokens/s; vs padded: %.2fx "
        "(shuffled), %.2fx (bucketed); real tokens %.3f (targets: >= 1.4x over pad tails, >= 0.99)",
        one_row[1] / best["packed rows + pad tails, sdpa_packed"][1],
        one_row[1] / best["padded (shuffled, 4/batch)"][1],
        one_row[1] / best["padded (length-bucketed)"][1],
        one_row[0],
    )


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from eve import EveConfig, EveForCausalLM

    cfg = EveConfig.from_preset(
        "tiny",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = EveForCausalLM(cfg).train()
    rng = np.random.default_rng(0)
    for attn in ("sdpa", "sdpa_packed"):  # warm-up of both attention paths
        model.set_attn_implementation(attn)
        warm = make_samples(8, rng)
        run(model, [[[0, 1, 2, 3]], [[4, 5, 6, 7]]], Collator(packing=True), warm)
    sft = make_samples(192, rng, "sft")
    bench_set(model, "sft", sft, rng)
    bench_set(model, "captions", make_samples(256, rng, "captions"), rng)
    packed_plan = plan_batches(
        [len(s["input_ids"]) for s in sft], max_length=1024, packing=True, tokens_per_batch=4096
    )
    mask_cost(model, packed_plan, sft)


def mask_cost(model, batches, samples) -> None:
    """Time transformers' dense block-diagonal mask for one packed batch vs the sdpa_packed plan."""
    from transformers.masking_utils import create_causal_mask

    batch = Collator(packing=True)([[samples[i] for i in r] for r in batches[0]])
    embeds = torch.zeros(*batch["input_ids"].shape, model.config.hidden_size)
    for attn in ("sdpa", "sdpa_packed"):
        model.set_attn_implementation(attn)
        t0 = time.perf_counter()
        for _ in range(10):
            mask = create_causal_mask(model.config, embeds, None, None, position_ids=batch["position_ids"])
        size = mask.numel() if isinstance(mask, torch.Tensor) else sum(g.numel() for g in mask.gathers)
        log.info(
            "mask for one packed batch %s, %s: %.2f ms, %d elements",
            tuple(batch["input_ids"].shape),
            attn,
            (time.perf_counter() - t0) * 100,
            size,
        )


if __name__ == "__main__":
    main()
