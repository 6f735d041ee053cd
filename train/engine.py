"""One training loop for the three EVE stages: plain single process or DeepSpeed (ZeRO-2/3).

    train(config)                       # config.stage.name picks the row of train/stages.py

The loop (per optimizer step):
    1. take `grad_accum` micro-batches for this rank and count their supervised tokens and aligned
       images; all-reduce the counts, so every micro-batch of every rank knows the global totals;
    2. per micro-batch: frozen teachers (no grad) -> model forward with `image_hidden_layers` ->
       CE and per-teacher PAL losses -> backward of (CE * tokens + PAL * images) / global counts;
    3. clip, optimizer step, LR schedule step; log; checkpoint every `save_every` steps.
Weighting by global counts makes the step's gradient the gradient of the mean CE over all supervised
tokens of the global batch (and the mean PAL over all its images), however the batch is split into
micro-batches and ranks: 2 ranks == 1 rank with twice the accumulation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.aligning import ALIGNER_CONFIG, AlignerConfig, PatchAligner, layers_for
from train.checkpointing import load_checkpoint, resolve_resume, save_checkpoint
from train.config import RunConfig, config_to_dict
from train.distributed_utils import DistInfo, all_reduce_sum, barrier, init_distributed
from train.stages import (
    Stage,
    apply_stage,
    frozen_check,
    get_stage,
    log_parameter_counts,
    lower_llm_modules,
    module_groups,
)
from train.teacher import TeacherSet, build_teachers, teacher_keys
from train.train_logging import MetricsWriter, get_logger

IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_hw", "labels")


# ----------------------------------------------------------------------------------------------
# The trained module: model + aligning heads; its forward returns the loss terms


class TrainModule(nn.Module):
    """The EVE model and its aligning heads: everything the optimizer (and DeepSpeed) owns.

    The teachers are not part of it: they are frozen, run before the forward, and are never sharded.
    """

    def __init__(self, model: nn.Module, aligner: PatchAligner | None) -> None:
        super().__init__()
        self.model = model
        self.aligner = aligner

    def forward(
        self, batch: dict[str, torch.Tensor], teacher_outputs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, Any]:
        """{"ce": mean CE, "n_loss_tokens", "align": [per-teacher PAL loss]} of one micro-batch."""
        has_images = "image_grid_hw" in batch and batch["image_grid_hw"].shape[0] > 0
        run_aligner = self.aligner is not None and has_images
        out = self.model(
            **{k: batch[k] for k in MODEL_KEYS if k in batch},
            image_hidden_layers=self.aligner.layers if run_aligner else None,
            use_cache=False,
        )
        align: list[torch.Tensor] = []
        if run_aligner:
            _, align = self.aligner(out.image_hidden_states, batch["image_grid_hw"], teacher_outputs)
        return {"ce": out.loss, "n_loss_tokens": out.n_loss_tokens, "align": align}


# ----------------------------------------------------------------------------------------------
# Counting (before the forward, so that the normalisers can be all-reduced first)


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Supervised (shifted) targets of a batch, exactly as EveForCausalLM counts them."""
    supervised = batch["labels"][:, 1:] != IGNORE_INDEX
    if "position_ids" in batch and "attention_mask" not in batch:  # packed: no target across samples
        supervised &= batch["position_ids"][:, 1:] != 0
    return int(supervised.sum())


def count_aligned_images(batch: dict[str, torch.Tensor], teachers: TeacherSet) -> list[int]:
    """Per teacher: images with a valid teacher area (dummy images, box all 0, have none)."""
    counts = []
    for view in teachers.view_of:
        _, box_key = teacher_keys(view)
        boxes = batch.get(box_key)
        counts.append(0 if boxes is None else int(((boxes[:, 2] > 0) & (boxes[:, 3] > 0)).sum()))
    return counts


def count_tokens(batch: dict[str, torch.Tensor], pad_token_id: int) -> int:
    """Non-padding positions (for tokens/s): attention_mask when padded, else ids != pad."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["input_ids"] != pad_token_id).sum())


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str, min_lr_ratio: float):
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


# ----------------------------------------------------------------------------------------------
# Building the model, processor, teachers and aligner


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
        if mc.preset != "tiny":
            raise ValueError(
                f"model.llm_path is not set: preset {mc.preset!r} starts from a pretrained LLM "
                "(EVE-7B: Vicuna-7B v1.5); only the 'tiny' preset may start from a random LLM"
            )
        return None
    return _require_dir(
        mc.llm_path,
        "model.llm_path",
        "set it to a local Llama/Vicuna directory (e.g. Vicuna-7B v1.5) in the YAML or with --model.llm_path",
    )


def check_inputs(config: RunConfig, stage: Stage) -> None:
    """Fail before any process group or model is built when a path in the config is missing."""
    from train.data import expand_shards

    if init_dir(config, stage) is None:
        llm_dir(config)
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


def build_model(config: RunConfig, stage: Stage):
    """(EveForCausalLM, EveProcessor) for this stage: from the previous stage's export, an LLM, or random."""
    from transformers import LlamaConfig

    from eve import EveConfig, EveForCausalLM, EveProcessor
    from eve.assets import load_default_tokenizer, load_tokenizer
    from eve.configuration_eve import PRESETS

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
        return model, processor

    vision = {k: v for k, v in PRESETS[mc.preset].items() if k not in LlamaConfig.__dataclass_fields__}
    llm = llm_dir(config)
    if llm is not None:
        model = EveForCausalLM.from_llm(
            str(llm), gguf_file=mc.gguf_file, dtype=dtype, **{**vision, **mc.overrides}
        )
        if mc.tokenizer_path:
            tokenizer = load_tokenizer(mc.tokenizer_path)
        elif mc.gguf_file:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(llm), gguf_file=mc.gguf_file)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        else:
            tokenizer = load_tokenizer(llm)
    else:
        model = EveForCausalLM(EveConfig.from_preset(mc.preset, **mc.overrides))
        tokenizer = load_tokenizer(mc.tokenizer_path) if mc.tokenizer_path else load_default_tokenizer()
    model.set_attn_implementation(mc.attn_implementation)
    return model, EveProcessor.from_config(tokenizer, model.config, template)


def build_aligner(
    config: RunConfig, model: nn.Module, teachers: TeacherSet, init_path: str | None, rank: int
):
    """The PAL heads: continued from the init export when it has matching ones, else fresh; None without teachers."""
    logger = get_logger(__name__, rank)
    if not teachers.teachers:
        return None
    wanted = AlignerConfig(
        hidden_size=model.config.hidden_size,
        teacher_widths=teachers.widths,
        layers=layers_for(model.config.num_hidden_layers, config.aligning.layer_step),
        num_heads=config.aligning.num_heads,
        attn_scale=config.aligning.attn_scale,
        loss_weights=teachers.loss_weights,
    )
    if init_path is not None and (Path(init_path) / ALIGNER_CONFIG).is_file():
        saved = PatchAligner.load(init_path)
        same_shape = dataclasses.replace(saved.config, loss_weights=wanted.loss_weights) == wanted
        if same_shape:
            saved.config = wanted  # loss weights come from this run's teachers
            logger.info("aligning layer continued from %s", init_path)
            return saved
        logger.warning(
            "aligning layer in %s has another shape (%s): starting it fresh", init_path, saved.config
        )
    return PatchAligner(wanted)


# ----------------------------------------------------------------------------------------------
# Data


def build_train_loader(
    config: RunConfig, stage: Stage, processor, model_config, teachers: TeacherSet, dist_info: DistInfo
):
    """This rank's resumable loader of micro-batches (train/data.py), with teacher views and dummy images."""
    from train.data import DataOptions, build_dataloader
    from train.packing import DummyImage

    dc = config.data
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
    )


def count_records(config: RunConfig) -> int:
    """Training records per epoch (before bad ones are skipped), for `epochs`-based step counts.

    LLaVA JSON: its entries. Shards: the curation's manifest.jsonl beside them (its "shard" field),
    else tar headers are read (a full pass over the files: only for small sets).
    """
    from train.data import expand_shards

    dc = config.data
    if dc.json is not None:
        text = Path(dc.json).read_text()
        n = (
            sum(1 for line in text.splitlines() if line.strip())
            if dc.json.endswith(".jsonl")
            else len(json.loads(text))
        )
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


def endless(loader) -> Any:
    """The loader's batches, epoch after epoch (its state_dict() stays the resumable position)."""
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        if not produced:
            raise RuntimeError(
                "the training data produced no batch: every record was skipped (see the summary)"
            )


# ----------------------------------------------------------------------------------------------
# Optimizer, DeepSpeed


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
    bf16 = config.model.dtype == "bfloat16"
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    return ds


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


def zero_stage(ds_config: dict | None) -> int:
    """ZeRO stage of a DeepSpeed config (0 without DeepSpeed)."""
    if ds_config is None:
        return 0
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# ----------------------------------------------------------------------------------------------
# Export


def export(
    output: Path,
    module: TrainModule,
    processor,
    engine: Any,
    ds_config: dict | None,
    dist_info: DistInfo,
) -> None:
    """save_pretrained (+ tokenizer, processor config) and aligner.safetensors + aligner_config.json."""
    if zero_stage(ds_config) == 3:
        # Gather the ZeRO-3 shards onto rank 0 (layer by layer, to CPU).
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = None
    if dist_info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        model = module.model
        if state is not None:
            model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            model.save_pretrained(str(output), state_dict=model_state)
        else:
            model.save_pretrained(str(output))
        processor.save_pretrained(str(output))
        if module.aligner is not None:
            aligner = module.aligner
            if state is not None:
                aligner = PatchAligner(module.aligner.config)
                aligner.load_state_dict(
                    {k[len("aligner.") :]: v for k, v in state.items() if k.startswith("aligner.")}
                )
            aligner.save(output)
        get_logger(__name__, dist_info.rank).info("exported %s", output)
    barrier()


# ----------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class StepStats:
    """What one optimizer step logs (global over ranks)."""

    loss: float
    ce_loss: float
    align_loss: float
    per_teacher: list[float]
    tokens: int


def train(config: RunConfig) -> Path:
    """Train one stage; returns the export directory (or the run directory when stopped early)."""
    stage = get_stage(config.stage.name)
    tc = config.train
    check_inputs(config, stage)
    use_ds = tc.deepspeed is not None
    dist_info = init_distributed(use_ds)
    logger = get_logger(__name__, dist_info.rank)
    output_dir = Path(tc.output_dir)
    if dist_info.world_size > 1 and not use_ds:
        raise ValueError(
            "several processes need train.deepspeed (configs/deepspeed/zero2.json or zero3.json)"
        )
    if dist_info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_to_dict(config), indent=1))
    logger.info(
        "stage %s (%s), world size %d, device %s",
        stage.name,
        stage.title,
        dist_info.world_size,
        dist_info.device,
    )

    grad_accum = gradient_accumulation(config, dist_info.world_size)

    # Same seed on every rank: identical initial weights (DeepSpeed does not broadcast ZeRO-3 init).
    torch.manual_seed(tc.seed)
    model, processor = build_model(config, stage)
    # The stage table says which losses a stage trains; the aligning loss needs the teachers.
    teachers = build_teachers(config.teachers if "align" in stage.losses else []).to(dist_info.device)
    frozen_check(teachers)
    aligner = build_aligner(config, model, teachers, config.model.init_path, dist_info.rank)
    module = TrainModule(model, aligner).to(dist_info.device)
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    groups = module_groups(model, aligner)
    param_groups = apply_stage(
        stage,
        module,
        groups,
        config.optim.lr,
        config.optim.lr_scale,
        frozen=config.optim.frozen,
        frozen_modules=lower_llm_modules(model, config.optim.frozen_llm_layers),
    )
    log_parameter_counts(stage, groups, dist_info.rank)
    torch.manual_seed(tc.seed + dist_info.rank)  # per-rank randomness from here on

    loader = build_train_loader(config, stage, processor, model.config, teachers, dist_info)
    if tc.max_steps is not None:
        total_steps = tc.max_steps
    else:
        total_steps = max(1, int(tc.epochs * count_records(config)) // tc.global_batch_size)

    optimizer = torch.optim.AdamW(
        param_groups,
        lr=config.optim.lr,
        betas=config.optim.betas,
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
        fused=config.optim.fused,
    )
    schedule = lr_lambda(
        total_steps, config.optim.warmup_ratio, config.optim.schedule, config.optim.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, ds_config = None, None
    if use_ds:
        import deepspeed

        ds_config = deepspeed_config(config, grad_accum, dist_info.world_size)
        engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    autocast = torch.autocast(
        dist_info.device.type, dtype=torch.bfloat16, enabled=config.model.dtype == "bfloat16" and not use_ds
    )

    step = 0
    resume_from = resolve_resume(tc.resume, output_dir)
    if resume_from is not None:
        step, rank_state = load_checkpoint(
            resume_from,
            dist_info=dist_info,
            module=module,
            optimizer=optimizer,
            scheduler=scheduler,
            ds_engine=engine,
        )
        loader.load_state_dict(rank_state["data"])
    elif tc.resume == "auto":
        logger.info("--resume auto: no checkpoint in %s, starting fresh", output_dir)
    metrics = MetricsWriter(output_dir, dist_info.is_main, tc.tensorboard, start_step=step)
    logger.info(
        "%d steps of %d samples (micro-batch %d x accumulation %d x %d ranks), from step %d",
        total_steps,
        tc.global_batch_size,
        tc.micro_batch_size,
        grad_accum,
        dist_info.world_size,
        step,
    )

    module.train()
    progress = _progress_bar(total_steps, step, dist_info.is_main)
    batches = endless(loader)
    while step < total_steps:
        t0 = time.perf_counter()
        micro = [_to_device(next(batches), dist_info.device) for _ in range(grad_accum)]
        lr = optimizer.param_groups[0]["lr"]  # the LR this step's update uses
        stats = train_step(
            module, engine, optimizer, micro, teachers, dist_info, config, processor.pad_token_id, autocast
        )
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t0
        if step % tc.log_every == 0 or step == total_steps:
            record = {
                "step": step,
                "loss": stats.loss,
                "ce_loss": stats.ce_loss,
                "align_loss": stats.align_loss,
                "lr": lr,
                "tokens_per_s": stats.tokens / dt,
            }
            for t, value in zip((t.config for t in teachers.teachers), stats.per_teacher):
                record[f"align_loss/{t.backend}:{t.name}"] = value
            metrics.write(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{stats.loss:.4f}", ce=f"{stats.ce_loss:.4f}", al=f"{stats.align_loss:.4f}"
            )
        if (tc.save_every and step % tc.save_every == 0) or (step == total_steps and tc.save_every):
            save_checkpoint(
                output_dir,
                step,
                dist_info=dist_info,
                module=module,
                optimizer=optimizer,
                scheduler=scheduler,
                rank_state={"data": loader.state_dict()},
                ds_engine=engine,
                keep_last=tc.keep_last,
            )
        if tc.stop_after is not None and step >= tc.stop_after:
            logger.info("stopping after step %d (train.stop_after)", step)
            break
    if progress is not None:
        progress.close()
    metrics.close()
    loader.log_summary()

    if step < total_steps or not config.export.enabled:
        return output_dir
    export_dir = output_dir / config.export.dir
    export(export_dir, module, processor, engine, ds_config, dist_info)
    return export_dir


def train_step(
    module: TrainModule,
    engine: Any,
    optimizer: torch.optim.Optimizer,
    micro: list[dict[str, torch.Tensor]],
    teachers: TeacherSet,
    dist_info: DistInfo,
    config: RunConfig,
    pad_token_id: int,
    autocast: contextlib.AbstractContextManager,
) -> StepStats:
    """Forward/backward over this rank's micro-batches and one optimizer step."""
    n_teachers = len(teachers.teachers)
    weights = teachers.loss_weights
    # Global normalisers: supervised tokens and, per teacher, aligned images of the whole step.
    local = [0.0] * (2 + n_teachers)
    for batch in micro:
        local[0] += count_loss_tokens(batch)
        local[1] += count_tokens(batch, pad_token_id)
        for t, n in enumerate(count_aligned_images(batch, teachers)):
            local[2 + t] += n
    total = all_reduce_sum(local, dist_info.device)
    n_tokens_global, n_images_global = total[0], total[2:]
    # Gradients are averaged over ranks by DeepSpeed: scale by world size to get a sum.
    rank_scale = dist_info.world_size

    sums = [0.0] * (1 + n_teachers)  # this rank's share of the global means (detached)
    for batch in micro:
        n_tok = count_loss_tokens(batch)
        n_img = count_aligned_images(batch, teachers)
        teacher_outputs = teachers(batch) if n_teachers else []
        with autocast:
            out = (engine or module)(batch, teacher_outputs)
        if int(out["n_loss_tokens"]) != n_tok:
            raise RuntimeError(f"model counted {int(out['n_loss_tokens'])} supervised tokens, engine {n_tok}")
        ce_w = n_tok / n_tokens_global if n_tokens_global else 0.0
        loss = out["ce"].float() * ce_w
        sums[0] += out["ce"].item() * ce_w
        for t, align in enumerate(out["align"]):
            al_w = n_img[t] / n_images_global[t] if n_images_global[t] else 0.0
            loss = loss + weights[t] * align.float() * al_w
            sums[1 + t] += align.item() * al_w
        if engine is not None:
            engine.backward(loss * rank_scale, scale_wrt_gas=False)
            engine.step()  # DeepSpeed steps (clip + update + zero_grad) only at the accumulation boundary
        else:
            loss.backward()
    if engine is None:
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], config.optim.grad_clip
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sums = all_reduce_sum(sums, dist_info.device)
    per_teacher = sums[1:]
    align = sum(w * a for w, a in zip(weights, per_teacher))
    return StepStats(
        loss=sums[0] + align,
        ce_loss=sums[0],
        align_loss=align,
        per_teacher=per_teacher,
        tokens=int(total[1]),
    )


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Command line (shared by the three entry scripts)


def run_stage(stage_name: str, argv: list[str] | None = None) -> Path | None:
    """Parse `--config X.yaml --section.key value ...` and train `stage_name`."""
    import os
    import sys

    from train.config import config_from_argv, help_text
    from train.train_logging import setup_console_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment as well).
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(
            f"usage: {stage_name}: --config FILE.yaml [--section.key VALUE ...] [--resume [auto|DIR]]\n"
        )
        sys.stdout.write(help_text() + "\n")
        return None
    config = config_from_argv(argv)
    if config.stage.name is None:
        config.stage.name = stage_name
    elif config.stage.name != stage_name:
        raise ValueError(
            f"the config is for stage {config.stage.name!r} but this script trains {stage_name!r}: "
            f"use train/{_SCRIPTS[config.stage.name]} or fix stage.name"
        )
    setup_console_logging(int(os.environ.get("RANK", "0")))
    return train(config)


_SCRIPTS = {"stage1": "pretrain_stage1.py", "stage2": "pretrain_stage2.py", "sft": "sft.py"}
