"""Computed padding: a batch's packed rows as they are (a padded tail on the last) vs end to end in one row.

    python bench/bench_padding.py [--stage stage2|sft] [--steps 8] [--threads 2] [--compile]

The demo's own micro-batches (32 samples: stage 2 captions from runs/demo/data/curated/shards, or
SFT conversations from runs/demo/data/sft_easy_vqa.json; `make curate` writes both), collated both
ways with the "sdpa_packed" backend, and the engine's `train_step` (teacher forward, model
forward/backward, aligning loss, AdamW) timed on each, alternating, so that machine noise hits both
alike. Prints tokens computed per step (real and padding) and the time ratio; `--compile` adds the
one row under `model.compile` (its compilation done on the same batches before the timing).
"""

from __future__ import annotations

import argparse
import copy
import glob
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
from eve.assets import load_default_tokenizer  # noqa: E402
from train.build import build_aligner, build_train_loader, compile_for_training  # noqa: E402
from train.config import load_config  # noqa: E402
from train.distributed import DistInfo  # noqa: E402
from train.engine import Trainer, TrainModule, endless  # noqa: E402
from train.stages import STAGES, apply_stage, module_groups  # noqa: E402
from train.teacher import build_teachers  # noqa: E402

DATA = REPO / "runs/demo/data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("stage2", "sft"), default="stage2")
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time one row with model.compile")
    parser.add_argument("--data", default=str(DATA), help="the demo's data folder (`make curate`)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if args.stage == "stage2":
        shards = sorted(glob.glob(str(data / "curated/shards/*.tar")))
        if not shards:
            raise SystemExit(f"no shards under {data / 'curated/shards'}: run `make curate` first")
        config = load_config(REPO / "configs/tiny/stage2.yaml", [("data.shards", shards)])
    else:
        if not (data / "sft_easy_vqa.json").is_file():
            raise SystemExit(f"no {data / 'sft_easy_vqa.json'}: run `make curate` first")
        config = load_config(
            REPO / "configs/tiny/sft.yaml",
            [("data.json", str(data / "sft_easy_vqa.json")), ("data.image_root", str(data))],
        )
    stage = STAGES[args.stage]
    torch.manual_seed(0)
    model = EveForCausalLM(EveConfig.from_preset("tiny"))
    model.set_attn_implementation(config.model.attn_implementation)  # the shipped configs': sdpa_packed
    processor = EveProcessor.from_config(load_default_tokenizer(), model.config, stage.template)
    teachers = build_teachers(config.teachers)
    module = TrainModule(model, build_aligner(config, model, teachers)).train()
    groups = apply_stage(stage, module, module_groups(model, module.aligner), 1e-4, {})
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    dist_info = DistInfo(0, 1, 0, torch.device("cpu"))
    loaders = [
        build_train_loader(config, stage, processor, model.config, teachers, dist_info) for _ in range(2)
    ]
    assert loaders[0].dataset.collator.one_row, "the shipped config should collate packed batches as one row"
    loaders[1].dataset.collator.one_row = False  # the same samples in the same order, as rows of max_length
    one_row, rows = ([b for b, _ in zip(endless(x), range(args.steps + 1))] for x in loaders)
    trainer = Trainer(
        module, optimizer, teachers, dist_info, grad_clip=1.0, pad_token_id=processor.pad_token_id, bf16=True
    )
    trainer.train_step([rows[0]])  # warm-up of both shapes
    trainer.train_step([one_row[0]])
    kinds = {"rows": (trainer, rows), "one row": (trainer, one_row)}
    if args.compile:  # a copy of the same module, compiled; its graphs built on all batches first
        compiled = copy.deepcopy(module)
        compile_for_training(compiled)
        opt = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=1e-4)
        compiled_trainer = Trainer(
            compiled, opt, teachers, dist_info, grad_clip=1.0, pad_token_id=processor.pad_token_id, bf16=True
        )
        for batch in one_row:
            compiled_trainer.train_step([batch])
        kinds["one row, compiled"] = (compiled_trainer, one_row)
    times = {name: [] for name in kinds}
    for i in range(1, args.steps + 1):
        for name, (runner, batches) in kinds.items():
            t0 = time.perf_counter()
            runner.train_step([batches[i]])
            times[name].append(time.perf_counter() - t0)
    real = np.mean([int((b["labels"] != -100).sum()) for b in one_row])
    for name, batch_list in (("rows", rows), ("one row", one_row)):
        shape = np.mean([b["input_ids"].numel() for b in batch_list])
        print(f"{name:8} {shape:7.0f} tokens computed per step, {np.median(times[name]):.3f} s/step (median)")
    print(f"supervised tokens per step: {real:.0f}")
    for name in list(kinds)[1:]:
        ratio = np.median(times["rows"]) / np.median(times[name])
        print(f"{name} vs rows: {ratio:.2f}x the tokens/s (the same samples per step)")
    if args.compile:
        print(f"one row, compiled: {np.median(times['one row, compiled']):.3f} s/step (median)")


if __name__ == "__main__":
    main()
