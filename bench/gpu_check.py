"""The figures only a GPU gives, in one run: attention kernels, stage-2 throughput, K-means, embedding.

On one H100/H200 (estimated 4-6 minutes, most of it building models and the CPU K-means; at most 10):
    python bench/gpu_check.py --out bench_gpu.json
On a CPU machine (about a minute on 2 cores): the same code at toy sizes; figures labelled "toy",
GPU-only parts skipped with the reason:
    OMP_NUM_THREADS=1 python bench/gpu_check.py [--only a,c,d]

Sections (--only a,b,c,d,e; each prints one line, all end in a markdown table and in --out as JSON):
 a  flash-attn varlen vs "sdpa_packed" (eve/attention.py) on the same packed stage-2 batch of the
    ~1B proxy (b), bf16 weights: forward+backward ms, loss and gradients of each; PASS when the losses
    agree within LOSS_RTOL (and the gradients within GRAD_RTOL: at random initialisation the loss
    alone barely sees attention). Without flash_attn or CUDA it is skipped, and "sdpa" (transformers'
    dense block-diagonal mask) vs "sdpa_packed" runs at toy size in its place, to exercise the check.
 b  stage-2 training throughput of a ~1B Llama-shaped proxy (GPU_PROXY: hidden 2048, 16 layers,
    16 heads, intermediate 5504, vocab 32000) with the eve-7b preset's PEL (14-px patches, stride 2,
    long side 672 px, any aspect ratio), the patch aligning loss against a randomly initialised
    CLIP-L/14-336-shaped teacher, packed batches, bf16, DeepSpeed ZeRO-3 on one GPU (torch AdamW +
    bf16 autocast without CUDA): the engine's `Trainer.train_step`, warm-up steps excluded.
    MFU = 6 N tokens/s / peak, N = trainable parameters less the input embedding table (a lookup);
    also given with the causal attention FLOPs of the packed segments (6 L^2 d per layer and
    segment). Both overstate the LM head, which runs on caption tokens only; the frozen teacher's
    forward is not counted.
 c  FAISS K-means (data_curation/cluster.py `kmeans`) of 1M x 768 random L2-normalised float32
    vectors to 10,000 centres, all points used: seconds per iteration (wall time / iterations, setup
    included) on the GPU (5 iterations) and with faiss-cpu (3, in a child process that sees no GPU),
    and the ratio. Without a GPU FAISS: 20k x 768 to 100 centres on the CPU, GPU skipped.
 d  curation feature extraction (data_curation/embed.py `build_extractor`): images/s of the
    configs/curation/laion.yaml embedder (EVA02-L-14, 224 px) and of CLIP ViT-L/14-336 (336 px),
    random weights, batch 256, the pipeline's precision (fp16 autocast on GPU), decoding excluded.
    Without CUDA: the embedded efficientnet-lite0 of configs/curation/embedded.yaml on a toy batch.
 e  (a) on an EVEv2 model (GPU_EVE2: the eve2-7b preset's patch embedding and per-modality layers,
    Qwen2-shaped, hidden 1536, 8 layers): the routed layers pass `position_ids` to flash-attn's
    varlen path; the toy stand-in is the tiny-eve2 preset.
A section that fails records its error and the others still run; --out is rewritten after each one.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("gpu_check")

LOSS_RTOL = 1e-2
"""Section (a): largest |loss_b - loss_a| / loss_a counted as agreement. bf16 keeps 8 significant bits
(rounding error up to 2^-9 = 0.2% per value); the two kernels accumulate in different orders in every
layer, and the loss, a mean over thousands of tokens, averages those errors down: 1% leaves room for
16 layers of them. At random initialisation the loss hardly depends on attention (near-uniform logits),
so this check alone would not catch a kernel that attends across packed samples: GRAD_RTOL does."""
GRAD_RTOL = 5e-2
"""Section (a): largest ||g_b - g_a|| / ||g_a|| over all gradients counted as agreement. Measured on the
toy model (bf16, CPU): sdpa vs sdpa_packed 3e-3, while attention across the packed samples (one causal
row, positions not restarted) moves the loss by only 0.16% but the gradients by 60%; 5e-2 lies between,
with room for the noise of 16 wider layers."""

PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
"""Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of the CUDA device name, first match."""


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Figure:
    """One row of the summary table."""

    name: str
    value: float | None
    unit: str
    device: str
    status: str
    """"ok" (measured), "PASS"/"FAIL" (section a), "toy" (the CPU path at toy size: not meaningful),
    "skipped" or "error"."""
    note: str = ""


@dataclass
class Section:
    """What one section measured: its table rows, the reasons for what it skipped, its raw numbers."""

    key: str = ""
    title: str = ""
    figures: list[Figure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    line: str = ""
    """The one-line summary printed when the section ends."""
    seconds: float = 0.0


@dataclass
class Machine:
    """What this run may use, decided once from the command line and the hardware."""

    device: torch.device
    name: str
    peak_flops: float | None
    """bf16 peak in FLOP/s for MFU (None: unknown, MFU not given)."""
    why_no_gpu: str | None
    """None on a CUDA machine; else why sizes are toy and GPU parts are skipped."""

    @property
    def cuda(self) -> bool:
        return self.why_no_gpu is None


def detect_machine(device: str, peak_tflops: float | None) -> Machine:
    """The CUDA device (unless `device` is "cpu") and its bf16 peak (`peak_tflops` or PEAK_TFLOPS)."""
    if device == "cpu" or not torch.cuda.is_available():
        why = "--device cpu" if device == "cpu" else "no CUDA device"
        name = f"CPU, {torch.get_num_threads()} torch threads"
        peak = peak_tflops * 1e12 if peak_tflops else None
        return Machine(torch.device("cpu"), name, peak, why)
    name = torch.cuda.get_device_name(0)
    if peak_tflops is None:
        peak_tflops = next((tf for key, tf in PEAK_TFLOPS if key in name), None)
    return Machine(torch.device("cuda", 0), name, peak_tflops * 1e12 if peak_tflops else None, None)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall time covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the previous section left (Python garbage, then the CUDA cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The stage-2 model, teacher and data of sections (a) and (b)


@dataclass(frozen=True)
class ProxyShape:
    """Model, teacher and batch sizes of sections (a) and (b): the GPU proxy or its CPU toy."""

    name: str
    preset: str
    """EveConfig preset: its vision (PEL) fields and its image size are kept."""
    llm: dict
    """EveConfig overrides of the LLM shape."""
    teacher: dict
    """transformers CLIPVisionConfig fields of the random teacher (its patch grid = the student's)."""
    micro_batch: int
    """Samples per micro-batch, packed end to end in one row."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    caption_words: int
    """Words per random caption."""
    warmup_steps: int
    timed_steps: int


GPU_PROXY = ProxyShape(
    name="~1B proxy",
    preset="eve-7b",
    llm=dict(
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    ),
    # CLIP ViT-L/14 at 336 px: 24 x 24 patches, the 672-px student grid.
    teacher=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    ),
    micro_batch=16,  # configs/eve7b/stage2.yaml
    grad_accum=2,
    caption_words=100,  # a dense caption: ~130 tokens beside up to 601 image tokens
    warmup_steps=2,
    timed_steps=5,
)
TOY = ProxyShape(
    name="tiny preset",
    preset="tiny",
    llm={},
    teacher=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
    ),  # 8 x 8 patches: the tiny preset's 64-px grid
    micro_batch=4,
    grad_accum=1,
    caption_words=12,
    warmup_steps=1,
    timed_steps=1,
)

GPU_EVE2 = replace(
    GPU_PROXY,
    name="~0.5B EVEv2 proxy",
    preset="eve2-7b",  # EVEv2's patch embedding, every part split per modality, Qwen2 layers
    llm=dict(
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
)
TOY_EVE2 = replace(TOY, name="tiny-eve2 preset", preset="tiny-eve2")

ASPECTS = ((1, 1), (3, 4), (4, 3), (9, 16), (16, 9), (1, 2), (2, 1), (2, 3), (3, 2))
"""(height, width) ratios of the synthetic images; the long side is the model's max_image_size."""
WORDS = (
    "a photo of the red blue green small large wooden old new dog cat man woman child car street house "
    "tree sky water table chair window light dark bright sitting standing next to on in with under near "
    "several two three people building field road city park beach mountain snow grass flower plate food"
).split()


def write_synthetic_shards(root: Path, n: int, long_side: int, caption_words: int) -> list[str]:
    """One webdataset tar of n smooth random JPEGs (long side `long_side`, ASPECTS) with word captions."""
    from PIL import Image

    from data_curation.shard import write_shard

    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            h, w = ASPECTS[i % len(ASPECTS)]
            h, w = long_side * h // max(h, w), long_side * w // max(h, w)
            coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=90)
            caption = " ".join(rng.choice(WORDS, caption_words))
            yield f"{i:06d}", buf.getvalue(), "jpg", caption, {}

    write_shard(root / "shard-000000.tar", samples())
    return [str(root / "shard-*.tar")]


def stage2_run_config(shape: ProxyShape, shards: list[str], attn: str, deepspeed: bool, checkpointing: bool):
    """configs/eve7b/stage2.yaml with the proxy's model, the synthetic shards and the shape's batch."""
    from train.config import load_config

    overrides = [
        ("model.preset", shape.preset),
        ("model.overrides", dict(shape.llm)),
        ("model.init_path", None),
        ("model.attn_implementation", attn),
        ("model.gradient_checkpointing", checkpointing),
        ("data.shards", shards),
        ("data.workers", 0),
        ("train.micro_batch_size", shape.micro_batch),
        ("train.grad_accum", shape.grad_accum),
        ("train.global_batch_size", shape.micro_batch * shape.grad_accum),
        ("train.deepspeed", str(REPO / "configs/deepspeed/zero3.json") if deepspeed else None),
    ]
    config = load_config(REPO / "configs/eve7b/stage2.yaml", overrides)
    # The 7B run's teacher settings (layer -2, bf16, loss weight) at the shape's image size.
    config.teachers = [replace(config.teachers[0], image_size=shape.teacher["image_size"], weights=None)]
    return config


def random_clip_teacher(config, shape: ProxyShape):
    """A TeacherSet of one randomly initialised CLIPVisionModel (no weights to download; shape is what
    costs time), read as the "hf_clip" backend reads a local directory."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from eve.image_processing_eve import CLIP_MEAN, CLIP_STD
    from train.teacher import TeacherSet
    from train.teacher_backends import HFVisionTeacher

    model = CLIPVisionModel(CLIPVisionConfig(**shape.teacher))
    return TeacherSet([HFVisionTeacher(config.teachers[0], model, CLIP_MEAN, CLIP_STD).freeze()])


@dataclass
class Stage2:
    """Everything sections (a) and (b) build before timing: run config, model, teacher, micro-batches."""

    config: object
    model: torch.nn.Module
    processor: object
    teachers: torch.nn.Module
    batches: list[dict]
    """Micro-batches (on the CPU), in loader order."""


def build_stage2(
    shape: ProxyShape,
    tmp: Path,
    n_batches: int,
    attn: str,
    device: torch.device,
    teacher: bool = True,
    deepspeed: bool = False,
    checkpointing: bool = False,
) -> Stage2:
    """The proxy model (fp32 master weights) and random teacher, built on `device` (initialising 1B
    parameters there takes seconds, not the CPU's minute), and n packed micro-batches on the CPU."""
    from eve import EveConfig, EveForCausalLM, EveProcessor
    from eve.assets import load_default_tokenizer
    from train.build import build_train_loader
    from train.distributed import DistInfo
    from train.engine import endless
    from train.stages import STAGES
    from train.teacher import TeacherSet

    long_side = EveConfig.from_preset(shape.preset).max_image_size
    shards = write_synthetic_shards(tmp, n_batches * shape.micro_batch, long_side, shape.caption_words)
    config = stage2_run_config(shape, shards, attn, deepspeed, checkpointing)
    torch.manual_seed(0)
    with device:
        model = EveForCausalLM(EveConfig.from_preset(config.model.preset, **config.model.overrides))
        teachers = random_clip_teacher(config, shape) if teacher else TeacherSet([])
    model.set_attn_implementation(attn)
    processor = EveProcessor.from_config(load_default_tokenizer(), model.config, config.data.template)
    loader = build_train_loader(
        config, STAGES["stage2"], processor, model.config, teachers, DistInfo(0, 1, 0, torch.device("cpu"))
    )
    stream = endless(loader)
    return Stage2(config, model, processor, teachers, [next(stream) for _ in range(n_batches)])


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the packed segments of (B, T) position_ids (each restarts at 0)."""
    starts = (position_ids.flatten() == 0).nonzero().flatten().tolist()
    return [b - a for a, b in zip(starts, [*starts[1:], position_ids.numel()])]


def attention_flops(batch: dict, hidden_size: int, num_layers: int) -> float:
    """Causal attention FLOPs of one training step on the batch: 6 L^2 d per layer and segment (QK^T and
    AV are 2 L^2 d each over the full square, half of it causal; backward = 2x forward)."""
    return 6.0 * sum(n * n for n in segment_lengths(batch["position_ids"])) * hidden_size * num_layers


# ----------------------------------------------------------------------------------------------
# (a) flash-attn varlen vs sdpa_packed


def flash_attn_missing() -> str | None:
    """Why flash-attention cannot run here, or None."""
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        return f"flash_attn is not importable ({e}; pip install flash-attn)"
    return None


def forward_backward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Loss of the model's forward on the batch's model inputs, after its backward."""
    from train.engine import MODEL_KEYS

    loss = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, use_cache=False).loss
    loss.backward()
    return loss.detach()


def compare_attention(model: torch.nn.Module, batch: dict, backends: tuple[str, str], reps: int) -> dict:
    """Per backend: loss and median forward+backward ms (after one warm-up); losses and gradients compared."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    out, reference = {}, None
    for attn in backends:
        model.set_attn_implementation(attn)
        model.zero_grad(set_to_none=True)
        loss = float(forward_backward(model, batch))  # the warm-up run; its gradients are compared
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if reference is None:
            reference = [g.clone() for g in grads]
        else:
            diff = sum(float((g.float() - r.float()).square().sum()) for g, r in zip(grads, reference))
            out["grad_rel_diff"] = math.sqrt(diff / sum(float(r.float().square().sum()) for r in reference))
        times = []
        for _ in range(reps):
            model.zero_grad(set_to_none=True)
            synchronize(device)
            t0 = time.perf_counter()
            forward_backward(model, batch)
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
        out[attn] = {"loss": loss, "ms": statistics.median(times)}
    del reference
    model.zero_grad(set_to_none=True)
    ref_loss = out[backends[0]]["loss"]
    out["loss_rel_diff"] = abs(out[backends[1]]["loss"] - ref_loss) / abs(ref_loss)
    out["loss_rtol"] = LOSS_RTOL
    out["grad_rtol"] = GRAD_RTOL
    out["loss_pass"] = out["loss_rel_diff"] <= LOSS_RTOL
    out["grad_pass"] = out["grad_rel_diff"] <= GRAD_RTOL
    return out


def section_a(machine: Machine, args: argparse.Namespace, tmp: Path) -> Section:
    """flash-attn varlen vs sdpa_packed on one packed batch; else sdpa vs sdpa_packed at toy size."""
    return attention_section(machine, tmp, GPU_PROXY, TOY, "a")


def section_e(machine: Machine, args: argparse.Namespace, tmp: Path) -> Section:
    """(a) on an EVEv2 model: the routed per-modality layers under flash-attn varlen vs sdpa_packed."""
    return attention_section(machine, tmp, GPU_EVE2, TOY_EVE2, "e")


def attention_section(machine: Machine, tmp: Path, gpu: ProxyShape, toy: ProxyShape, key: str) -> Section:
    """Two attention backends on one packed batch of the shape's model: losses, gradients, speed."""
    from train.engine import _to_device

    sec = Section()
    sec.skipped = [r for r in (machine.why_no_gpu, flash_attn_missing()) if r]
    measured = not sec.skipped
    shape = gpu if measured else toy
    a, b = ("sdpa_packed", "flash_attention_2") if measured else ("sdpa_packed", "sdpa")
    setup = build_stage2(shape, tmp, 1, a, machine.device, teacher=False)
    model = setup.model.to(torch.bfloat16).train()
    batch = _to_device(setup.batches[0], machine.device)
    result = compare_attention(model, batch, (a, b), reps=3 if measured else 1)
    tokens = int(batch["input_ids"].numel())
    sec.details = {
        "shape": shape.name,
        "backends": [a, b],
        "tokens": tokens,
        "segments": len(segment_lengths(batch["position_ids"])),
        **result,
    }
    loss_verdict = "PASS" if result["loss_pass"] else "FAIL"
    grad_verdict = "PASS" if result["grad_pass"] else "FAIL"
    summary = (
        f"{b} {result[b]['ms']:.1f} ms vs {a} {result[a]['ms']:.1f} ms fwd+bwd ({tokens} tokens); "
        f"loss {result[b]['loss']:.5f} vs {result[a]['loss']:.5f}, rel. diff {result['loss_rel_diff']:.1e} "
        f"(tol {LOSS_RTOL:g}) {loss_verdict}; grad rel. diff {result['grad_rel_diff']:.1e} "
        f"(tol {GRAD_RTOL:g}) {grad_verdict}"
    )
    toy = "" if measured else "toy "
    pair = f"{b} vs {a}"
    checks = [
        Figure(f"{toy}loss rel. diff, {pair}", result["loss_rel_diff"], f"tol {LOSS_RTOL:g}", machine.name, toy + loss_verdict),
        Figure(f"{toy}grad rel. diff, {pair}", result["grad_rel_diff"], f"tol {GRAD_RTOL:g}", machine.name, toy + grad_verdict),
    ]  # fmt: skip
    if measured:
        speed = result[a]["ms"] / result[b]["ms"]
        sec.figures = [Figure(f"fwd+bwd speed, {pair}", speed, "x", machine.name, "ok"), *checks]
        sec.line = f"({key}) {shape.name}: {summary}"
    else:
        reason = "; ".join(sec.skipped)
        sec.figures = [
            Figure("flash-attn varlen vs sdpa_packed", None, "", machine.name, "skipped", reason),
            *checks,
        ]
        sec.line = f"({key}) skipped: {reason}. Toy stand-in ({shape.name}): {summary}"
    return sec


# ----------------------------------------------------------------------------------------------
# (b) stage-2 training throughput


def parameter_counts(model: torch.nn.Module, aligner: torch.nn.Module | None) -> dict[str, int]:
    """Parameters per module group (train/stages.py), then the input embedding table (inside "llm")."""
    from train.stages import group_parameters, module_groups

    counts = {
        k: sum(p.numel() for p in ps) for k, ps in group_parameters(module_groups(model, aligner)).items()
    }
    counts["input_embedding"] = model.get_input_embeddings().weight.numel()
    return counts


def proxy_parameter_count(shape: ProxyShape) -> int:
    """Parameters of a shape's model and aligning heads, built on the meta device (no memory)."""
    from eve import EveConfig, EveForCausalLM
    from train.aligning import AlignerConfig, PatchAligner, layers_for

    with torch.device("meta"):
        model = EveForCausalLM(EveConfig.from_preset(shape.preset, **shape.llm))
        aligner = PatchAligner(
            AlignerConfig(
                hidden_size=model.config.hidden_size,
                teacher_widths=[shape.teacher["hidden_size"]],
                layers=layers_for(model.config.num_hidden_layers, 4),  # aligning.layer_step of the 7B run
            )
        )
    counts = parameter_counts(model, aligner)
    return sum(counts.values()) - counts["input_embedding"]


@dataclass
class Timed:
    """What the timed steps of section (b) did (warm-up steps excluded, except in `losses`)."""

    losses: list[float] = field(default_factory=list)
    """Loss of every step, warm-up included (finite values: the steps really trained)."""
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    """Non-padding positions (image and text) of the timed steps."""
    attention_flops: float = 0.0


def run_steps(trainer, steps: list[list[dict]], warmup: int, pad_token_id: int, config) -> Timed:
    """The engine's train_step on each step's micro-batches; wall time, tokens and attention FLOPs after `warmup`."""
    from train.engine import count_tokens

    out = Timed()
    device = trainer.dist.device
    for i, micro in enumerate(steps):
        synchronize(device)
        t0 = time.perf_counter()
        out.losses.append(trainer.train_step(micro).loss)
        synchronize(device)
        if i >= warmup:
            out.seconds.append(time.perf_counter() - t0)
            out.tokens += sum(count_tokens(b, pad_token_id) for b in micro)
            out.attention_flops += sum(
                attention_flops(b, config.hidden_size, config.num_hidden_layers) for b in micro
            )
    return out


def section_b(machine: Machine, args: argparse.Namespace, tmp: Path) -> Section:
    """Stage-2 tokens/s and MFU of the proxy through the engine's Trainer (toy size without CUDA)."""
    import deepspeed

    from train.build import build_aligner, build_optimizer, deepspeed_config
    from train.distributed import init_distributed
    from train.engine import Trainer, TrainModule, _to_device
    from train.stages import STAGES, apply_stage, module_groups

    shape = GPU_PROXY if machine.cuda else TOY
    use_ds = args.zero3 == "on" or (args.zero3 == "auto" and machine.cuda)
    attn = "sdpa_packed" if flash_attn_missing() or not machine.cuda else "flash_attention_2"
    warmup = shape.warmup_steps if args.warmup is None else args.warmup
    steps = shape.timed_steps if args.steps is None else args.steps
    dist_info = init_distributed(use_ds)  # DeepSpeed: a one-process group
    n_micro = (warmup + steps) * shape.grad_accum
    setup = build_stage2(
        shape,
        tmp,
        n_micro,
        attn,
        dist_info.device,
        deepspeed=use_ds,
        checkpointing=args.gradient_checkpointing,
    )
    config, model, teachers = setup.config, setup.model, setup.teachers
    aligner = build_aligner(config, model, teachers)
    module = TrainModule(model, aligner).to(dist_info.device).train()
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    param_groups = apply_stage(STAGES["stage2"], module, module_groups(model, aligner), config.optim.lr, {})
    optimizer, _ = build_optimizer(config, param_groups, warmup + steps)
    counts = parameter_counts(model, aligner)
    trainable = sum(p.numel() for g in param_groups for p in g["params"])
    n_mfu = trainable - counts["input_embedding"]  # a lookup, no matmul
    engine = None
    if use_ds:
        ds_config = deepspeed_config(config, shape.grad_accum, dist_info.world_size)
        engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        how, how_long = "ZeRO-3", "DeepSpeed ZeRO-3 (1 process), bf16"
    else:
        why = "--zero3 off" if args.zero3 == "off" else machine.why_no_gpu
        how, how_long = "torch AdamW", f"torch AdamW + bf16 autocast (no DeepSpeed: {why})"
    trainer = Trainer(
        module,
        optimizer,
        teachers,
        dist_info,
        grad_clip=config.optim.grad_clip,
        pad_token_id=setup.processor.pad_token_id,
        ds_engine=engine,
        bf16=not use_ds,  # DeepSpeed runs its own bf16 mode
    )
    micro = [_to_device(b, dist_info.device) for b in setup.batches]
    step_batches = [micro[i : i + shape.grad_accum] for i in range(0, n_micro, shape.grad_accum)]
    timed = run_steps(trainer, step_batches, warmup, setup.processor.pad_token_id, model.config)

    seconds = sum(timed.seconds)
    tok_s = timed.tokens / seconds
    peak = machine.peak_flops
    mfu = 6.0 * n_mfu * tok_s / peak if peak else None
    mfu_attn = mfu + timed.attention_flops / seconds / peak if peak else None
    teacher_params = sum(p.numel() for p in teachers.parameters())
    proxy_params = proxy_parameter_count(GPU_PROXY)
    sec = Section()
    sec.details = {
        "shape": shape.name,
        "model": {"preset": shape.preset, **shape.llm, "max_image_size": model.config.max_image_size},
        "teacher": shape.teacher,
        "parameters": {**counts, "trainable": trainable, "mfu_N": n_mfu, "teacher_frozen": teacher_params},
        "gpu_proxy_parameters": proxy_params,
        "optimizer": how_long,
        "attn_implementation": attn,
        "gradient_checkpointing": config.model.gradient_checkpointing,
        "micro_batch_samples": shape.micro_batch,
        "grad_accum": shape.grad_accum,
        "warmup_steps": warmup,
        "tokens_per_step": timed.tokens / len(timed.seconds),
        **asdict(timed),
        "tokens_per_s": tok_s,
        "peak_flops": peak,
        "mfu_6N": mfu,
        "mfu_6N_plus_attention": mfu_attn,
    }
    status, note = ("ok", "") if machine.cuda else ("toy", "not meaningful")
    no_peak = "no bf16 peak known: pass --peak-tflops"
    name = f"stage-2 tokens/s, {shape.name} (N = {n_mfu / 1e9:.2f}B), {how}, {attn}"
    sec.figures = [Figure(name, tok_s, "tokens/s", machine.name, status, note)]
    for label, value in (("MFU, 6N", mfu), ("MFU, 6N + causal attention", mfu_attn)):
        if value is None:
            sec.figures.append(Figure(label, None, "%", machine.name, "skipped", no_peak))
        else:
            sec.figures.append(Figure(label, 100 * value, "%", machine.name, status, note))
    if not machine.cuda:
        sec.skipped = [f"the GPU proxy ({proxy_params / 1e9:.2f}B parameters): {machine.why_no_gpu}"]
    mfu_text = f"MFU {100 * mfu:.1f}% (6N), {100 * mfu_attn:.1f}% (+attention)" if peak else no_peak
    sec.line = (
        f"(b) {shape.name}{'' if machine.cuda else ', toy size: not meaningful'}: "
        f"{trainable / 1e6:,.1f}M trainable parameters (N = {n_mfu / 1e6:,.1f}M without the input "
        f"embedding), teacher {teacher_params / 1e6:,.2f}M frozen; {how_long}, {attn}; {tok_s:,.0f} tokens/s "
        f"over {len(timed.seconds)} steps of {timed.tokens / len(timed.seconds):,.0f} tokens; {mfu_text}; "
        f"losses {', '.join(f'{x:.3f}' for x in timed.losses)}"
    )
    if not machine.cuda:
        sec.line += f"; GPU proxy ({proxy_params / 1e9:.2f}B parameters) skipped: {machine.why_no_gpu}"
    if engine is not None:
        engine.destroy()
    del trainer, engine, optimizer, module, model, aligner, micro, step_batches, setup
    release(dist_info.device)
    return sec


# ----------------------------------------------------------------------------------------------
# (c) FAISS K-means


def random_features(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 Gaussian rows, L2-normalised like the pipeline's features."""
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def kmeans_seconds(n: int, dim: int, k: int, iters: int) -> float:
    """Wall seconds of the pipeline's FAISS K-means (on the GPU whenever FAISS sees one), data excluded."""
    from data_curation.cluster import kmeans

    x = random_features(n, dim)
    t0 = time.perf_counter()
    kmeans(x, k, iters, seed=0, max_points_per_centroid=0, backend="faiss")
    return time.perf_counter() - t0


def kmeans_seconds_cpu(n: int, dim: int, k: int, iters: int) -> float:
    """kmeans_seconds with FAISS on the CPU: in a child process that sees no GPU when this one sees one."""
    import faiss

    if faiss.get_num_gpus() == 0:
        return kmeans_seconds(n, dim, k, iters)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, __file__, "--kmeans-child", str(n), str(dim), str(k), str(iters)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"CPU K-means child failed: {proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def section_c(machine: Machine, args: argparse.Namespace, tmp: Path) -> Section:
    """FAISS K-means seconds per iteration on the GPU and the CPU (toy size on the CPU alone)."""
    import faiss

    sec = Section()
    gpus = faiss.get_num_gpus() if machine.cuda else 0
    if gpus:
        n, dim, k, iters, cpu_iters = 1_000_000, 768, 10_000, 5, 3
    else:
        n, dim, k, iters, cpu_iters = 20_000, 768, 100, 5, 5
        sec.skipped = [
            machine.why_no_gpu
            or f"FAISS {faiss.__version__} sees no GPU (a faiss-cpu build): GPU K-means not measured"
        ]
    size = f"{n:,} x {dim} -> {k:,}"
    sec.details = {"n": n, "dim": dim, "k": k, "faiss": faiss.__version__, "faiss_gpus": gpus}
    cpu_s = kmeans_seconds_cpu(n, dim, k, cpu_iters) / cpu_iters
    sec.details.update(cpu_iterations=cpu_iters, cpu_s_per_iter=cpu_s)
    cpu_name = f"CPU, {os.cpu_count()} cores"
    if gpus:
        gpu_s = kmeans_seconds(n, dim, k, iters) / iters
        sec.details.update(gpu_iterations=iters, gpu_s_per_iter=gpu_s, speedup=cpu_s / gpu_s)
        sec.figures = [
            Figure(f"K-means {size}, GPU", gpu_s, "s/iteration", machine.name, "ok"),
            Figure(f"K-means {size}, faiss-cpu", cpu_s, "s/iteration", cpu_name, "ok"),
            Figure("K-means GPU speed-up", cpu_s / gpu_s, "x", machine.name, "ok"),
        ]
        sec.line = f"(c) K-means {size}: GPU {gpu_s:.3f} s/iter, CPU {cpu_s:.2f} s/iter, {cpu_s / gpu_s:.0f}x"
    else:
        sec.figures = [
            Figure(f"K-means {size}, faiss-cpu", cpu_s, "s/iteration", cpu_name, "toy"),
            Figure("K-means 1M x 768 -> 10k, GPU", None, "", "-", "skipped", sec.skipped[0]),
        ]
        sec.line = f"(c) K-means {size} (toy) faiss-cpu: {cpu_s:.4f} s/iter; GPU skipped: {sec.skipped[0]}"
    return sec


# ----------------------------------------------------------------------------------------------
# (d) curation feature extraction


def images_per_second(ecfg, device: torch.device, batches: int) -> tuple[float, str]:
    """Images/s of the pipeline's feature extractor on a ready uint8 batch (decoding excluded), and a label
    of the model, input size, autocast dtype and batch."""
    from data_curation.embed import autocast_dtype, build_extractor

    ext, size = build_extractor(ecfg, device)
    images = torch.randint(0, 256, (ecfg.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    for _ in range(2):  # warm-up (kernel selection, allocator)
        ext(images)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        ext(images)
    synchronize(device)
    rate = batches * ecfg.batch_size / (time.perf_counter() - t0)
    del ext, images
    release(device)
    dtype = autocast_dtype(ecfg.precision, device)
    precision = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
    return rate, f"{ecfg.model} {size}px {precision} batch {ecfg.batch_size}"


def section_d(machine: Machine, args: argparse.Namespace, tmp: Path) -> Section:
    """Images/s of the LAION embedders at batch 256 on the GPU; the embedded one on a toy CPU batch."""
    from data_curation.config import load_config

    sec = Section()
    rates = {}
    if machine.cuda:
        laion = load_config(REPO / "configs/curation/laion.yaml").embed
        for ecfg in (
            replace(laion, weights=None, batch_size=256),  # EVA02-L-14 at its own 224 px
            replace(laion, model="ViT-L-14-336", weights=None, image_size=336, batch_size=256),
        ):
            rate, label = images_per_second(ecfg, machine.device, batches=5)
            rates[f"{label}, random weights"] = rate
            sec.figures.append(Figure(f"embed {label}", rate, "images/s", machine.name, "ok"))
    else:
        sec.skipped = [f"EVA02-L-14 / ViT-L-14-336 at batch 256: {machine.why_no_gpu}"]
        ecfg = replace(load_config(REPO / "configs/curation/embedded.yaml").embed, batch_size=32)
        rate, label = images_per_second(ecfg, machine.device, batches=3)
        rates[f"{label}, CPU toy"] = rate
        sec.figures = [
            Figure(f"embed {label}", rate, "images/s", machine.name, "toy"),
            Figure(
                "embed EVA02-L-14 / ViT-L-14-336, batch 256", None, "", "-", "skipped", machine.why_no_gpu
            ),
        ]
    sec.details = {"images_per_s": rates}
    sec.line = "(d) " + "; ".join(f"{k}: {v:,.0f} images/s" for k, v in rates.items())
    if sec.skipped:
        sec.line += f"; skipped: {sec.skipped[0]}"
    return sec


# ----------------------------------------------------------------------------------------------
# Driver


SECTIONS: dict[str, tuple[str, Callable[[Machine, argparse.Namespace, Path], Section]]] = {
    "a": ("flash-attn varlen vs sdpa_packed", section_a),
    "b": ("stage-2 training throughput", section_b),
    "c": ("FAISS K-means", section_c),
    "d": ("curation feature extraction", section_d),
    "e": ("EVEv2 layers: flash-attn varlen vs sdpa_packed", section_e),
}


def run_section(key: str, machine: Machine, args: argparse.Namespace) -> Section:
    """One section, its failure recorded as an "error" row instead of ending the run."""
    title, run = SECTIONS[key]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sec = run(machine, args, Path(tmp))
        except Exception as e:  # a one-shot GPU run keeps the other sections' figures
            logger.error("section %s failed:\n%s", key, traceback.format_exc())
            error = f"{type(e).__name__}: {e}"
            sec = Section(
                line=f"({key}) ERROR {error}", figures=[Figure(title, None, "", machine.name, "error", error)]
            )
    release(machine.device)
    sec.key, sec.title, sec.seconds = key, title, time.perf_counter() - t0
    return sec


def markdown_table(sections: list[Section]) -> str:
    """All sections' figures as a markdown table."""
    lines = ["| | Figure | Value | Unit | Device | Status |", "|---|---|---:|---|---|---|"]
    for sec in sections:
        for f in sec.figures:
            value = "-" if f.value is None else f"{f.value:,.3g}" if abs(f.value) < 100 else f"{f.value:,.0f}"
            status = f"{f.status}: {f.note}" if f.note else f.status
            lines.append(f"| ({sec.key}) | {f.name} | {value} | {f.unit} | {f.device} | {status} |")
    return "\n".join(lines)


def environment(machine: Machine) -> dict:
    """Versions and hardware, for the JSON."""
    import importlib.metadata

    versions = {}
    for package in (
        "torch",
        "transformers",
        "deepspeed",
        "flash-attn",
        "faiss-gpu",
        "faiss-cpu",
        "open_clip_torch",
        "timm",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "device": machine.name,
        "cuda": machine.cuda,
        "why_no_gpu": machine.why_no_gpu,
        "peak_bf16_tflops": None if machine.peak_flops is None else machine.peak_flops / 1e12,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> list[Section]:
    """Run the chosen sections, print one line each and the table, write --out; returns the sections."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default="a,b,c,d,e", help="comma-separated sections to run (default: a,b,c,d,e)"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON file for all figures (e.g. bench_gpu.json); none if unset"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="bf16 dense peak for MFU (default from the CUDA device name: 989 for H100/H200 SXM)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu"),
        default="auto",
        help="auto: the GPU when CUDA has one; cpu: toy sizes and GPU parts skipped even on a GPU machine",
    )
    parser.add_argument(
        "--zero3",
        choices=("auto", "on", "off"),
        default="auto",
        help="(b) DeepSpeed ZeRO-3 on one process: auto = with CUDA; on also on the CPU (gloo)",
    )
    parser.add_argument("--steps", type=int, help="(b) timed optimizer steps (default: 5 on GPU, 1 toy)")
    parser.add_argument("--warmup", type=int, help="(b) untimed first steps (default: 2 on GPU, 1 toy)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="(b) recompute decoder layers in the backward, as the 7B runs (not counted in MFU)",
    )
    parser.add_argument("--kmeans-child", nargs=4, type=int, help=argparse.SUPPRESS)  # n dim k iters
    args = parser.parse_args(argv)
    if args.kmeans_child:  # the CPU side of section (c), in a process that sees no GPU
        print(json.dumps({"seconds": kmeans_seconds(*args.kmeans_child)}))
        return []
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    machine = detect_machine(args.device, args.peak_tflops)
    peak = "unknown" if machine.peak_flops is None else f"{machine.peak_flops / 1e12:.0f} TFLOP/s"
    print(
        f"device: {machine.name}; bf16 peak {peak}"
        + (f"; toy sizes ({machine.why_no_gpu})" if not machine.cuda else "")
    )
    report = {"environment": environment(machine), "sections": {}}
    sections, t0 = [], time.perf_counter()
    for key in keys:
        logger.info("section %s: %s ...", key, SECTIONS[key][0])
        sec = run_section(key, machine, args)
        sections.append(sec)
        print(f"{sec.line}  [{sec.seconds:.0f} s]", flush=True)
        report["sections"][key] = asdict(sec)
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
    print(markdown_table(sections))
    return sections


if __name__ == "__main__":
    main()
