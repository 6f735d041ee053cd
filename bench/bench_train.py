"""Training throughput of the tiny EVE model, and that as a fraction of this machine's matmul peak.

    python bench/bench_train.py [--steps 6] [--micro-batch 16] [--threads N] [--compile]

1. Peak: the best of several square bf16 (and fp32) matmuls, FLOP/s = 2 n^3 / time.
2. Training: the "tiny" preset, stage-2 trainable set (everything but the teacher, the heaviest
   stage), the embedded efficientnet-lite0 teacher, packed micro-batches from the curated demo shards
   (runs/demo/data/curated/shards, from `make curate`; random-pixel images otherwise). Timed: the
   engine's `train_step` (teacher forward, model forward/backward, PAL, AdamW), data loading excluded,
   with the demo configs' attention (`sdpa_packed`: each micro-batch one row, attention per sample).
   FLOPs per step are counted by torch's FlopCounterMode on one step (matmuls and convolutions,
   forward and backward); utilisation = achieved FLOP/s / measured peak.
3. `--compile`: bf16 eager vs `model.compile` on the same batches in interleaved rounds, the compile
   time, and what compiling saves net of it over the demo's stage 2 (`--demo-steps`).
Figures vary with other processes on the machine: the script reports what it measured.
"""

from __future__ import annotations

import argparse
import copy
import glob
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.build import build_aligner, build_train_loader, compile_for_training  # noqa: E402
from train.config import load_config  # noqa: E402
from train.distributed import DistInfo  # noqa: E402
from train.engine import Trainer, TrainModule, count_tokens, endless  # noqa: E402
from train.stages import STAGES, apply_stage, module_groups  # noqa: E402
from train.teacher import build_teachers  # noqa: E402


def matmul_peak(dtype: torch.dtype, sizes=(512, 1024, 2048), seconds: float = 1.0) -> float:
    """Best FLOP/s of (n x n) @ (n x n) over sizes, each repeated for about `seconds`."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def synthetic_shards(root: Path, n: int = 256) -> list[str]:
    """Random-pixel 64x64 PNGs with short captions, for machines without the curated demo data."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", f"a random image number {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return [str(root / "shard-*.tar")]


def tokens_per_s(trainer: Trainer, batches: list, pad_token_id: int) -> float:
    """Non-padding tokens per second over one train_step per batch."""
    tokens, t0 = 0, time.perf_counter()
    for batch in batches:
        trainer.train_step([batch])
        tokens += count_tokens(batch, pad_token_id)
    return tokens / (time.perf_counter() - t0)


def compare_compiled(module, optimizer, teachers, dist_info, micro, pad_token_id, demo_steps: int) -> None:
    """bf16 eager vs `model.compile` (train/build.py), rounds interleaved; gain net of the compile time."""
    compiled = copy.deepcopy(module)
    compiled_opt = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=1e-4)
    compile_for_training(compiled)
    make = dict(grad_clip=1.0, pad_token_id=pad_token_id, bf16=True)
    eager_tr = Trainer(module, optimizer, teachers, dist_info, **make)
    compiled_tr = Trainer(compiled, compiled_opt, teachers, dist_info, **make)
    t0 = time.perf_counter()
    for batch in micro:  # each new length range may add a graph: compile on all the batches once
        compiled_tr.train_step([batch])
    warm = time.perf_counter() - t0
    step_s = {"eager": [], "compiled": []}
    for _ in range(3):  # interleaved rounds: the host's load hits both alike
        for name, trainer in (("eager", eager_tr), ("compiled", compiled_tr)):
            t0 = time.perf_counter()
            for batch in micro:
                trainer.train_step([batch])
            step_s[name].append((time.perf_counter() - t0) / len(micro))
    eager_s, compiled_s = min(step_s["eager"]), min(step_s["compiled"])
    compile_s = warm - len(micro) * compiled_s  # the first pass over the batches, less its step time
    net = demo_steps * (eager_s - compiled_s) - compile_s
    print(
        f"compile (bf16): {eager_s:.3f} s/step eager, {compiled_s:.3f} s/step compiled = "
        f"{eager_s / compiled_s:.2f}x; compilation {compile_s:.0f} s; over {demo_steps} steps (the demo's "
        f"stage 2) the compiled run saves {net:.0f} s net of compilation"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--micro-batch", type=int, default=16, help="samples per micro-batch")
    parser.add_argument("--compile", action="store_true", help="also time model.compile against eager")
    parser.add_argument("--demo-steps", type=int, default=730, help="steps of the demo's stage 2 (net gain)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from eve import EveConfig, EveForCausalLM, EveProcessor
    from eve.assets import load_default_tokenizer

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores")
    peak_bf16 = matmul_peak(torch.bfloat16)
    peak_fp32 = matmul_peak(torch.float32)
    print(f"matmul peak: bf16 {peak_bf16 / 1e9:.1f} GFLOP/s, fp32 {peak_fp32 / 1e9:.1f} GFLOP/s")

    shards = sorted(glob.glob(str(REPO / "runs/demo/data/curated/shards/*.tar")))
    tmp = tempfile.TemporaryDirectory()
    source = "curated demo shards"
    if not shards:
        shards, source = (
            synthetic_shards(Path(tmp.name)),
            "random-pixel images (run `make curate` for real data)",
        )
    overrides = [
        ("data.shards", shards),
        ("data.template", "plain"),
        ("train.micro_batch_size", args.micro_batch),
        ("teachers", [{"backend": "timm", "name": "efficientnet_lite0", "image_size": 128}]),
        ("optim.grad_clip", 1.0),
    ]
    config = load_config(REPO / "configs/tiny/stage1.yaml", overrides)
    stage = STAGES["stage2"]
    torch.manual_seed(0)
    model = EveForCausalLM(EveConfig.from_preset("tiny"))
    model.set_attn_implementation(config.model.attn_implementation)  # the demo's: sdpa_packed, one row
    processor = EveProcessor.from_config(load_default_tokenizer(), model.config, "plain")
    teachers = build_teachers(config.teachers)
    aligner = build_aligner(config, model, teachers)
    module = TrainModule(model, aligner).train()
    param_groups = apply_stage(stage, module, module_groups(model, aligner), 1e-4, {})
    optimizer = torch.optim.AdamW(param_groups, lr=1e-4, weight_decay=0.0)
    dist_info = DistInfo(0, 1, 0, torch.device("cpu"))
    loader = build_train_loader(config, stage, processor, model.config, teachers, dist_info)
    batches = endless(loader)
    micro = [next(batches) for _ in range(args.steps + 1)]
    print(
        f"data: {source}; micro-batch {args.micro_batch} samples, "
        f"{np.mean([count_tokens(b, processor.pad_token_id) for b in micro]):.0f} tokens on average"
    )

    flops_per_token = None
    for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
        trainer = Trainer(
            module,
            optimizer,
            teachers,
            dist_info,
            grad_clip=1.0,
            pad_token_id=processor.pad_token_id,
            bf16=bf16,
        )
        if flops_per_token is None:
            counter = FlopCounterMode(display=False)
            with counter:  # one step, counted (also a warm-up)
                trainer.train_step(micro[:1])
            flops_per_token = counter.get_total_flops() / count_tokens(micro[0], processor.pad_token_id)
        else:
            trainer.train_step(micro[:1])  # warm-up
        tok_s = tokens_per_s(trainer, micro[1:], processor.pad_token_id)
        achieved = tok_s * flops_per_token
        print(
            f"train ({name}): {tok_s:,.0f} tokens/s, {flops_per_token / 1e6:.0f} MFLOP/token, "
            f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak_bf16:.1%} of the bf16 matmul peak "
            f"({achieved / peak_fp32:.1%} of fp32)"
        )
    if args.compile:
        compare_compiled(
            module, optimizer, teachers, dist_info, micro, processor.pad_token_id, args.demo_steps
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
