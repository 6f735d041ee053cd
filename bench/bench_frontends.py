"""Cost of each vision front-end on the same tiny LLM: image tokens per image and training tokens/s.

    python bench/bench_frontends.py [--steps 4] [--batch 16] [--threads 2]

The front-ends of `make compare` (train/compare.py VARIANTS: the PEL and every connector over the
embedded efficientnet-lite0), each on the tiny 4-layer LLM, train on the same batches: 16 easy-vqa
train images with one question and answer each (vicuna_v1, packed into one row), forward + backward
of the LM loss under bf16 autocast, frozen encoders included in the forward. The aligning loss is
left out (it is EVE's training signal, not its front-end). Steps of the variants alternate, so that
machine noise hits them alike; the table gives the median step time and tokens/s over all positions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eve import EveConfig, EveForCausalLM, EveProcessor  # noqa: E402
from eve.assets import easy_vqa_dir, load_default_tokenizer  # noqa: E402
from eve.image_processing_eve import load_image  # noqa: E402
from train.compare import VARIANTS  # noqa: E402
from train.packing import Collator  # noqa: E402

FRONTENDS = ("eve", "llava", "mof-interleaved", "mof-additive", "comm", "sva", "pargo")


def build(name: str) -> tuple[EveForCausalLM, EveProcessor]:
    """The variant's model (random tiny LLM, seed 0) and processor."""
    v = VARIANTS[name]
    overrides = {} if v.connector is None else {"vision_connector": v.connector}
    torch.manual_seed(0)
    model = EveForCausalLM(EveConfig.from_preset(v.preset, **overrides)).train()
    return model, EveProcessor.from_config(load_default_tokenizer(), model.config, "vicuna_v1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="timed steps per front-end")
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = easy_vqa_dir("train")
    questions = json.loads((split / "questions.json").read_text())[: args.batch]
    samples = [
        (
            [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            load_image(split / "images" / f"{i}.png"),
        )
        for q, a, i in questions
    ]
    runs = {}
    for name in FRONTENDS:
        model, processor = build(name)
        batch = Collator(pad_token_id=processor.pad_token_id, one_row=True)(
            [[processor.encode(turns, image) for turns, image in samples]]
        )
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = (model, batch, params)

    def step(model, batch, params) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        for p in params:
            p.grad = None
        return time.perf_counter() - t0

    for run in runs.values():  # warm-up
        step(*run)
    times = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, run in runs.items():
            times[name].append(step(*run))
    print(f"torch {torch.__version__}, {args.threads} threads; {args.batch} samples per step\n")
    print(
        f"{'front-end':18}{'image tokens':>13}{'positions':>11}{'s/step':>9}{'tokens/s':>10}{'trained params':>16}"
    )
    for name, (model, batch, params) in runs.items():
        tower = model.vision_tower
        tokens = getattr(tower, "num_tokens", None) or tower.num_image_tokens(8, 8)
        dt = float(np.median(times[name]))
        n = batch["input_ids"].numel()
        print(
            f"{name:18}{tokens:>13}{n:>11}{dt:>9.3f}{n / dt:>10,.0f}{sum(p.numel() for p in params) / 1e6:>15.2f}M"
        )


if __name__ == "__main__":
    main()
