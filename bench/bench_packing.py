"""Packed vs padded batches on a mixed-length SFT-like set: non-pad token fraction and tokens/s.

Tiny EVE (tests/conftest.py sizes, 4 layers), forward + backward on CPU. Lengths follow a
LLaVA-665K-like mix: short VQA answers, long conversations, text-only samples. The same samples,
in the same order, are batched (a) padded, in shuffled order (what a plain trainer does), (b) padded
with length bucketing, (c) packed into rows of max_length with a fixed token budget.
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
    plans = {
        "padded (shuffled, 4/batch)": (
            [[[i] for i in shuffled[k : k + 4]] for k in range(0, len(samples), 4)],
            False,
        ),
        "padded (length-bucketed, <=4096 tok)": (
            plan_batches(lengths, max_length=max_length, packing=False, tokens_per_batch=budget),
            False,
        ),
        "packed (rows of 1024, 4096 tok/batch)": (
            plan_batches(lengths, max_length=max_length, packing=True, tokens_per_batch=budget),
            True,
        ),
    }
    run(
        model, plans["packed (rows of 1024, 4096 tok/batch)"][0][:2], Collator(packing=True), samples
    )  # warm-up
    results = {}
    for name, (batches, packing) in plans.items():
        frac, tps = run(model, batches, Collator(packing=packing, pad_to_multiple_of=8), samples)
        results[name] = (frac, tps)
        log.info("%-40s non-pad %.3f  %8.0f tokens/s  (%d batches)", name, frac, tps, len(batches))
    base = results["padded (shuffled, 4/batch)"][1]
    packed = results["packed (rows of 1024, 4096 tok/batch)"]
    log.info(
        "packed vs padded (shuffled): %.2fx tokens/s; non-pad %.3f (targets: >= 1.3x, >= 0.97)",
        packed[1] / base,
        packed[0],
    )
    log.info(
        "packed vs padded (bucketed): %.2fx tokens/s",
        packed[1] / results["padded (length-bucketed, <=4096 tok)"][1],
    )


if __name__ == "__main__":
    main()
