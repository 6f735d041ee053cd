"""Packed vs padded batches on a mixed-length SFT-like set: non-pad token fraction and tokens/s.

Tiny EVE (tests/conftest.py sizes, 4 layers), forward + backward on CPU. Lengths follow a
LLaVA-665K-like mix: short VQA answers, long conversations, text-only samples. The same samples,
in the same order, are batched (a) padded, in shuffled order (what a plain trainer does), (b) padded
with length bucketing, (c) packed into rows of max_length with a fixed token budget, under transformers'
"sdpa" (a dense block-diagonal mask: SDPA's masked math path over whole rows) and under "sdpa_packed"
(eve/attention.py: causal SDPA per sample, no mask). Padded batches carry a 2D mask, for which both
backends run the same transformers sdpa code.
"""

import logging
import os
import time

import numpy as np
import torch

from train.packing import Collator, plan_batches

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("bench_packing")


def make_samples(n: int, rng: np.random.Generator) -> list[dict]:
    """Synthetic encoded samples: text lengths from a long-tailed mix, 1 in 4 text-only."""
    samples = []
    for _ in range(n):
        length = int(np.clip(rng.lognormal(5.0, 0.8), 24, 1000))
        ids = rng.integers(3, 32000, size=length).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def run(model, batches, collator, samples) -> tuple[float, float]:
    """(non-pad fraction, supervised+context tokens/s) over all batches, forward + backward."""
    real, total, t0 = 0, 0, time.perf_counter()
    for rows in batches:
        batch = collator([[samples[i] for i in r] for r in rows])
        real += sum(len(samples[i]["input_ids"]) for r in rows for i in r)
        total += batch["input_ids"].numel()
        out = model(**batch)
        out.loss.backward()
    dt = time.perf_counter() - t0
    return real / total, real / dt


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
    samples = make_samples(192, rng)
    lengths = [len(s["input_ids"]) for s in samples]
    max_length, budget = 1024, 4096
    shuffled = list(range(len(samples)))
    rng.shuffle(shuffled)
    packed_plan = plan_batches(lengths, max_length=max_length, packing=True, tokens_per_batch=budget)
    runs = {  # name -> (batches, packing, attn_implementation)
        "padded (shuffled, 4/batch)": (
            [[[i] for i in shuffled[k : k + 4]] for k in range(0, len(samples), 4)],
            False,
            "sdpa",
        ),
        "padded (length-bucketed, <=4096 tok)": (
            plan_batches(lengths, max_length=max_length, packing=False, tokens_per_batch=budget),
            False,
            "sdpa",
        ),
        "packed, sdpa (dense block mask)": (packed_plan, True, "sdpa"),
        "packed, sdpa_packed (per sample)": (packed_plan, True, "sdpa_packed"),
    }
    for attn in ("sdpa", "sdpa_packed"):  # warm-up of both attention paths
        model.set_attn_implementation(attn)
        run(model, packed_plan[:2], Collator(packing=True), samples)
    results = {}
    for name, (batches, packing, attn) in runs.items():
        model.set_attn_implementation(attn)
        frac, tps = run(model, batches, Collator(packing=packing, pad_to_multiple_of=8), samples)
        results[name] = (frac, tps)
        log.info("%-40s non-pad %.3f  %8.0f tokens/s  (%d batches)", name, frac, tps, len(batches))
    base = results["padded (shuffled, 4/batch)"][1]
    bucketed = results["padded (length-bucketed, <=4096 tok)"][1]
    for name in ("packed, sdpa (dense block mask)", "packed, sdpa_packed (per sample)"):
        frac, tps = results[name]
        log.info(
            "%s vs padded: %.2fx tokens/s (shuffled), %.2fx (bucketed); non-pad %.3f "
            "(targets: >= 1.3x, >= 0.97)",
            name,
            tps / base,
            tps / bucketed,
            frac,
        )
    mask_cost(model, packed_plan, samples)


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
