"""Everything a stage builds before its first step, from the run config: one function per part.

check_inputs(config, stage)            # every path in the config exists, before any process group
build_model(config, stage)             # EveForCausalLM + EveProcessor (previous export, LLM or random),
                                       # with LoRA adapters when lora.enabled
build_aligner(config, model, teachers) # the aligning heads: continued from the export, or fresh
build_train_loader(...)                # this rank's resumable loader of micro-batches
build_optimizer(config, groups, steps) # torch AdamW + the LR schedule
deepspeed_config(config, accum, world) # the DeepSpeed JSON with its "auto" fields filled
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tarfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig

from eve import EveConfig, EveForCausalLM, EveProcessor
from eve.assets import load_default_tokenizer, load_tokenizer
from eve.configuration_eve import PRESETS
from eve.processing_eve import PROCESSOR_CONFIG_NAME
from train.aligning import ALIGNER_CONFIG, AlignerConfig, PatchAligner, layers_for
from train.config import RunConfig
from train.data import DataOptions
from train.distributed import DistInfo
from train.loader import EveDataLoader, build_dataloader
from train.lora import add_lora
from train.packing import DummyImage
from train.records import expand_shards, load_json_records
from train.stages import Stage, get_stage
from train.teacher import TeacherSet

logger = logging.getLogger(__name__)

# Attention backends that split a packed row at its samples (a row's length costs nothing by itself)
SEGMENT_ATTENTION = ("sdpa_packed", "flash_attention_2", "flash_attention_3")


# ----------------------------------------------------------------------------------------------
# Paths


def _require_dir(path: str | None, what: str, fix: str) -> Path:
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(f"{what} {path!r} does not exist: {fix}")
    return Path(path)


def init_dir(config: RunConfig, stage: Stage) -> Path | None:
    """The export this stage starts from (stages 2-3: required), or None for stage 1 from an LLM."""
    mc = config.model
    if stage.previous is None and mc.init_path is None:
        return None
    previous = get_stage(stage.previous).make_target if stage.previous else None
    fix = (
        f"run `make {previous}` first (it writes that export), or set --model.init_path"
        if previous
        else "set --model.init_path to an export directory"
    )
    return _require_dir(mc.init_path, f"{stage.name}: model.init_path", fix)


def llm_dir(config: RunConfig) -> Path | None:
    """Stage 1's LLM directory, or None for a random tiny LLM (other presets need one)."""
    mc = config.model
    if mc.llm_path is None:
        if not mc.preset.startswith("tiny"):
            raise ValueError(
                f"model.llm_path is not set: preset {mc.preset!r} starts from a pretrained LLM "
                "(EVE-7B: Vicuna-7B v1.5); only the 'tiny*' presets may start from a random LLM"
            )
        return None
    return _require_dir(
        mc.llm_path,
        "model.llm_path",
        "set it to a local Llama/Vicuna directory (e.g. Vicuna-7B v1.5) in the YAML or with --model.llm_path",
    )


def check_inputs(config: RunConfig, stage: Stage) -> None:
    """Fail before any process group or model is built when a path in the config is missing."""
    if init_dir(config, stage) is None:
        llm_dir(config)
        mc = config.model
        encoders = mc.overrides.get("vision_encoders", PRESETS.get(mc.preset, {}).get("vision_encoders", []))
        for i, encoder in enumerate(encoders):
            if encoder.get("path") is not None and not Path(encoder["path"]).exists():
                raise FileNotFoundError(
                    f"vision_encoders[{i}].path {encoder['path']!r} of preset {mc.preset!r} does not exist: "
                    "set the encoders' local paths with model.overrides.vision_encoders"
                )
    if config.train.deepspeed is not None and not Path(config.train.deepspeed).is_file():
        raise FileNotFoundError(
            f"train.deepspeed: {config.train.deepspeed} does not exist (see configs/deepspeed/)"
        )
    if config.data.json is not None and not Path(config.data.json).is_file():
        raise FileNotFoundError(
            f"data.json: {config.data.json} does not exist (`make curate` writes the demo's)"
        )
    if config.data.shards:
        expand_shards(config.data.shards)
    for i, teacher in enumerate(config.teachers):
        if teacher.weights is not None and not Path(teacher.weights).exists():
            raise FileNotFoundError(
                f"teachers.{i}.weights: {teacher.weights} does not exist: set a local path"
            )


# ----------------------------------------------------------------------------------------------
# Model, processor, aligning heads


def build_model(config: RunConfig, stage: Stage) -> tuple[EveForCausalLM, EveProcessor]:
    """(EveForCausalLM, EveProcessor) for this stage: from the previous stage's export, an LLM, or random."""
    mc = config.model
    template = config.data.template or stage.template
    dtype = torch.float32  # master weights; bf16 is autocast (plain) or DeepSpeed's bf16 mode
    init = init_dir(config, stage)
    if init is not None:
        model = EveForCausalLM.from_pretrained(
            str(init), dtype=dtype, attn_implementation=mc.attn_implementation, **mc.overrides
        )
        tokenizer = load_tokenizer(mc.tokenizer_path or init)
        processor = EveProcessor.from_config(tokenizer, model.config, template)
        saved = init / PROCESSOR_CONFIG_NAME
        inherited = json.loads(saved.read_text()).get("answer_instruction") if saved.is_file() else None
        processor.answer_instruction = config.export.answer_instruction or inherited
    else:
        model, processor = _new_model(config, template)
    if config.lora.enabled:
        # Adapters above the layers that optim.frozen_llm_layers keeps frozen (they would not train).
        add_lora(model, config.lora, first_layer=config.optim.frozen_llm_layers)
    return model, processor


def _new_model(config: RunConfig, template: str) -> tuple[EveForCausalLM, EveProcessor]:
    """A model that no export holds yet: from an LLM directory (or GGUF), or a random tiny LLM."""
    mc = config.model
    llm = llm_dir(config)
    if llm is None:
        model = EveForCausalLM(EveConfig.from_preset(mc.preset, **mc.overrides))
        tokenizer = load_tokenizer(mc.tokenizer_path) if mc.tokenizer_path else load_default_tokenizer()
    else:
        # The preset's vision fields on top of the LLM's own text config.
        vision = {k: v for k, v in PRESETS[mc.preset].items() if k not in LlamaConfig.__dataclass_fields__}
        model = EveForCausalLM.from_llm(
            str(llm), gguf_file=mc.gguf_file, dtype=torch.float32, **{**vision, **mc.overrides}
        )
        if mc.tokenizer_path:
            tokenizer = load_tokenizer(mc.tokenizer_path)
        elif mc.gguf_file:
            tokenizer = AutoTokenizer.from_pretrained(str(llm), gguf_file=mc.gguf_file)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        else:
            tokenizer = load_tokenizer(llm)
    model.set_attn_implementation(mc.attn_implementation)
    processor = EveProcessor.from_config(tokenizer, model.config, template)
    processor.answer_instruction = config.export.answer_instruction
    return model, processor


def build_aligner(config: RunConfig, model: nn.Module, teachers: TeacherSet) -> PatchAligner | None:
    """The aligning heads: continued from the init export when it has matching ones, else fresh; None without teachers."""
    if not teachers.teachers:
        return None
    wanted = AlignerConfig(
        hidden_size=model.config.hidden_size,
        teacher_widths=teachers.widths,
        layers=layers_for(model.config.num_hidden_layers, config.aligning.layer_step),
        num_heads=config.aligning.num_heads,
        attn_scale=config.aligning.attn_scale,
        loss_weights=teachers.loss_weights,
        names=teachers.names,
    )
    init_path = config.model.init_path
    if init_path is not None and (Path(init_path) / ALIGNER_CONFIG).is_file():
        saved = PatchAligner.load(init_path)
        # Loss weights come from this run; heads saved without names (older exports) match by shape.
        names = saved.config.names or wanted.names
        if dataclasses.replace(saved.config, loss_weights=wanted.loss_weights, names=names) == wanted:
            saved.config = wanted
            logger.info("aligning layer continued from %s", init_path)
            return saved
        logger.warning(
            "aligning layer in %s has another shape (%s): starting it fresh", init_path, saved.config
        )
    return PatchAligner(wanted)


def compile_for_training(module: nn.Module) -> None:
    """`torch.compile` in place, with dynamic shapes, every decoder layer and every aligning head.

    Per layer rather than the whole model: the packed-attention plan, the image splice and the loss
    pick rows by data, which would break one whole-model graph into many; the layers are where the
    fusable work is. `nn.Module.compile` keeps parameters and state-dict keys as they are.
    """
    for layer in module.model.get_decoder().layers:
        layer.compile(dynamic=True)
    if module.aligner is not None:
        for head in module.aligner.heads:
            head.compile(dynamic=True)


# ----------------------------------------------------------------------------------------------
# Data


def build_train_loader(
    config: RunConfig,
    stage: Stage,
    processor: EveProcessor,
    model_config: EveConfig,
    teachers: TeacherSet,
    dist_info: DistInfo,
    log_dir: str | Path | None = None,
) -> EveDataLoader:
    """This rank's resumable loader of micro-batches (train/data.py), with teacher views and dummy images.

    log_dir: the run's output directory, where the records skipped in the first epoch are listed
    (`skipped.jsonl`, `skipped.rank{r}.jsonl` with several ranks); None: not written.
    """
    dc, tc = config.data, config.train
    options = DataOptions(
        shards=list(dc.shards),
        json=dc.json,
        image_root=dc.image_root,
        template=dc.template or stage.template,
        max_length=dc.max_length,
        packing=dc.packing,
        batch_size=None if dc.tokens_per_batch is not None else config.train.micro_batch_size,
        tokens_per_batch=dc.tokens_per_batch,
        window=dc.window,
        shuffle=dc.shuffle,
        seed=config.train.seed,
        max_samples=dc.max_samples,
        max_pixels=dc.max_pixels,
    )
    views = list(teachers.views)
    # Image-free micro-batches get a zero-weight dummy image, so that the PEL, the aligning heads and
    # the teachers run on every rank for every micro-batch (ZeRO-3 gathers stay in lockstep, DDP sees
    # no unused parameter). This is the one place that guarantees it; the model does not.
    dummy = DummyImage.from_config(model_config, [v.size for v in views])
    return build_dataloader(
        options,
        processor,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        num_workers=dc.workers,
        teacher_views=views,
        dummy_image=dummy,
        # The run's length, for the end-of-epoch line on what it means over the good samples; a
        # max_steps run with a token budget per batch has no sample count to state.
        epochs=tc.epochs if tc.max_steps is None else None,
        total_samples=(
            tc.max_steps * tc.global_batch_size
            if tc.max_steps is not None and dc.tokens_per_batch is None
            else None
        ),
        log_dir=log_dir,
        # These backends attend within each packed sample whatever the row holds, so a batch's rows
        # go end to end in one row and no padded tail is computed.
        one_row=config.model.attn_implementation in SEGMENT_ATTENTION,
    )


def count_records(config: RunConfig) -> int:
    """Training records per epoch (before bad ones are skipped), for `epochs`-based step counts.

    LLaVA JSON: its records, read by the loader's own reader (train/records.py), so that a broken
    file gets the same error naming it and the fix. Shards: the curation's manifest.jsonl beside them
    (its "shard" field), else tar headers are read (a full pass over the files: only for small sets).
    """
    dc = config.data
    if dc.json is not None:
        n = len(load_json_records(dc.json, dc.image_root))
        return n if dc.max_samples is None else min(n, dc.max_samples)
    shards = [Path(p) for p in expand_shards(dc.shards)]
    per_shard: dict[Path, int] = {}
    for manifest in {p.parent / "manifest.jsonl" for p in shards}:
        if manifest.is_file():
            for line in manifest.read_text().splitlines():
                if line.strip():
                    shard = manifest.parent / json.loads(line)["shard"]
                    per_shard[shard] = per_shard.get(shard, 0) + 1
    n = 0
    for shard in shards:
        if shard in per_shard:
            n += per_shard[shard]
            continue
        if shard.stat().st_size > 2**30:
            raise ValueError(
                f"{shard} is not listed in a manifest.jsonl beside it: set train.max_steps "
                "(counting the samples of large shards would read them all)"
            )
        with tarfile.open(shard, "r|*") as tar:  # headers only
            n += len({m.name.split(".", 1)[0] for m in tar if m.isfile()})
    return n if dc.max_samples is None else min(n, dc.max_samples)


def total_steps(config: RunConfig) -> int:
    """Optimizer steps of the run: train.max_steps, else epochs x records / global batch."""
    tc = config.train
    if tc.max_steps is not None:
        return tc.max_steps
    return max(1, int(tc.epochs * count_records(config)) // tc.global_batch_size)


# ----------------------------------------------------------------------------------------------
# Optimizer, schedule, DeepSpeed


def lr_lambda(
    total_steps: int, warmup_ratio: float, schedule: str, min_lr_ratio: float
) -> Callable[[int], float]:
    """Multiplier of the peak LR for update `step` (0-based): linear warm-up, then cosine or constant."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def build_optimizer(
    config: RunConfig, param_groups: list[dict], steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """torch AdamW over the stage's parameter groups and its warm-up + cosine (or constant) schedule."""
    oc = config.optim
    optimizer = torch.optim.AdamW(
        param_groups, lr=oc.lr, betas=oc.betas, eps=oc.eps, weight_decay=oc.weight_decay, fused=oc.fused
    )
    schedule = lr_lambda(steps, oc.warmup_ratio, oc.schedule, oc.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def gradient_accumulation(config: RunConfig, world_size: int) -> int:
    """Micro-batches per optimizer step, checked against global = micro x accumulation x world size."""
    tc = config.train
    if config.data.tokens_per_batch is not None:
        if tc.grad_accum is None:
            raise ValueError("data.tokens_per_batch needs train.grad_accum (micro-batches per step)")
        return tc.grad_accum
    per_step = tc.micro_batch_size * world_size
    grad_accum = tc.grad_accum if tc.grad_accum is not None else max(1, tc.global_batch_size // per_step)
    if grad_accum * per_step != tc.global_batch_size:
        raise ValueError(
            f"train.global_batch_size {tc.global_batch_size} != micro_batch_size {tc.micro_batch_size} x "
            f"grad_accum {grad_accum} x world size {world_size}: change one of them"
        )
    return grad_accum


def deepspeed_config(config: RunConfig, grad_accum: int, world_size: int) -> dict:
    """The DeepSpeed JSON with its "auto" fields filled from the run config."""
    path = Path(config.train.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(
            f"train.deepspeed: {path} does not exist (see configs/deepspeed/zero2.json, zero3.json)"
        )
    ds = json.loads(path.read_text())
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(
            f"{path}: remove 'optimizer'/'scheduler': the engine passes its own torch AdamW and schedule "
            "(a DeepSpeed optimizer would compile fused/cpu Adam kernels and bypass optim.* settings)"
        )
    fill = {
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": config.train.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": config.optim.grad_clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ValueError(
                f'{path}: {key} = {ds[key]} disagrees with the run config ({value}); set it to "auto"'
            )
        ds[key] = value
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": config.model.dtype == "bfloat16"}
    return ds


def zero_stage(ds_config: dict | None) -> int:
    """ZeRO stage of a DeepSpeed config (0 without DeepSpeed)."""
    if ds_config is None:
        return 0
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
