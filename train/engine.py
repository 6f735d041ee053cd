"""One training loop for the three EVE stages: plain single process or DeepSpeed (ZeRO-2/3).

    train(config)                       # config.stage.name picks the row of train/stages.py

The loop (per optimizer step, `Trainer.train_step`):
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

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn
from tqdm.auto import tqdm

from eve import EveProcessor
from eve.modeling_eve import supervised_targets
from train.aligning import PatchAligner
from train.build import (
    build_aligner,
    build_model,
    build_optimizer,
    build_train_loader,
    check_inputs,
    compile_for_training,
    deepspeed_config,
    gradient_accumulation,
    total_steps,
    zero_stage,
)
from train.checkpointing import load_checkpoint, read_config, read_meta, resolve_resume, save_checkpoint
from train.config import RunConfig, config_to_dict
from train.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed
from train.lora import (
    ADAPTER_DIR,
    lora_layers,
    lora_stage,
    merged_state_dict,
    only_adapters_train,
    save_adapter,
)
from train.metrics import MetricsWriter
from train.rundir import check_resume_config, claim, publish_export, write_claim
from train.stages import (
    apply_stage,
    frozen_check,
    get_stage,
    log_parameter_counts,
    lower_llm_modules,
    module_groups,
)
from train.teacher import TeacherSet, build_teachers, teacher_keys

logger = logging.getLogger(__name__)

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_hw", "labels")


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
    """Supervised targets of a batch, by the model's own definition (`supervised_targets`)."""
    packed = "attention_mask" not in batch and "position_ids" in batch
    return int(supervised_targets(batch["labels"], batch["position_ids"] if packed else None).sum())


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
# One optimizer step


@dataclasses.dataclass
class StepStats:
    """What one optimizer step logs (global over ranks)."""

    loss: float
    ce_loss: float
    align_loss: float
    per_teacher: list[float]
    tokens: int


@dataclasses.dataclass
class Trainer:
    """What updates the weights: the trained module, its optimizer, the frozen teachers, the job."""

    module: TrainModule
    optimizer: torch.optim.Optimizer
    teachers: TeacherSet
    dist: DistInfo
    grad_clip: float = 1.0
    """Max global gradient norm (0: none); DeepSpeed clips by its own config's value."""
    pad_token_id: int = 0
    """For tokens/s only."""
    ds_engine: Any = None
    """The DeepSpeed engine wrapping `module`, or None for the plain loop."""
    bf16: bool = False
    """bf16 autocast over fp32 weights (plain loop; DeepSpeed runs its own bf16 mode)."""

    def train_step(self, micro: list[dict[str, torch.Tensor]]) -> StepStats:
        """Forward/backward over this rank's micro-batches and one optimizer step."""
        teachers, weights = self.teachers, self.teachers.loss_weights
        n_teachers = len(teachers.names)  # aligning levels: one per teacher layer
        # Global normalisers: supervised tokens and, per teacher, aligned images of the whole step.
        local = [0.0] * (2 + n_teachers)
        for batch in micro:
            local[0] += count_loss_tokens(batch)
            local[1] += count_tokens(batch, self.pad_token_id)
            for t, n in enumerate(count_aligned_images(batch, teachers)):
                local[2 + t] += n
        total = all_reduce_sum(local, self.dist.device)
        n_tokens_global, n_images_global = total[0], total[2:]
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16)

        sums = [0.0] * (1 + n_teachers)  # this rank's share of the global means (detached)
        for batch in micro:
            teacher_outputs = teachers(batch) if n_teachers else []
            with autocast:
                out = (self.ds_engine or self.module)(batch, teacher_outputs)
            ce_w = int(out["n_loss_tokens"]) / n_tokens_global if n_tokens_global else 0.0
            loss = out["ce"].float() * ce_w
            sums[0] += out["ce"].item() * ce_w
            for t, (align, n_img) in enumerate(zip(out["align"], count_aligned_images(batch, teachers))):
                al_w = n_img / n_images_global[t] if n_images_global[t] else 0.0
                loss = loss + weights[t] * align.float() * al_w
                sums[1 + t] += align.item() * al_w
            if self.ds_engine is not None:
                # DeepSpeed averages gradients over ranks: scale by the world size to get the global sum.
                self.ds_engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)
                self.ds_engine.step()  # clips, updates and zeroes only at the accumulation boundary
            else:
                loss.backward()
        if self.ds_engine is None:
            if self.grad_clip > 0:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        sums = all_reduce_sum(sums, self.dist.device)
        per_teacher = sums[1:]
        align = sum(w * a for w, a in zip(weights, per_teacher))
        return StepStats(sums[0] + align, sums[0], align, per_teacher, int(total[1]))


# ----------------------------------------------------------------------------------------------
# The stage


def train(config: RunConfig) -> Path:
    """Train one stage; returns the export directory (or the run directory when stopped early)."""
    stage = get_stage(config.stage.name)
    if config.lora.enabled:
        stage = lora_stage(stage)  # the adapters train where the stage trains the LLM
    tc = config.train
    check_inputs(config, stage)
    use_ds = tc.deepspeed is not None
    dist_info = init_distributed(use_ds)
    if dist_info.world_size > 1 and not use_ds:
        raise ValueError(
            "several processes need train.deepspeed (configs/deepspeed/zero2.json or zero3.json)"
        )
    # The run directory: whose it is, and whether a resumed run keeps its checkpoint's settings.
    output_dir = Path(tc.output_dir)
    config_dict = config_to_dict(config)
    resume_from = resolve_resume(tc.resume, output_dir)
    changed: list[str] = []
    if resume_from is not None:
        changed = check_resume_config(
            read_config(resume_from),
            config_dict,
            resume_from,
            tc.allow_config_change,
            defaults=config_to_dict(RunConfig()),
        )
    resumed_id = read_meta(resume_from).get("run_id") if resume_from is not None else None
    run_id, replaced = claim(output_dir, resumed_id, resume_from is not None, tc.overwrite)
    run_id = broadcast_object(run_id)  # rank 0's new id when the run starts fresh
    if dist_info.is_main:
        write_claim(output_dir, run_id, replaced)
        (output_dir / "config.json").write_text(json.dumps(config_dict, indent=1))
    barrier()
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
    aligner = build_aligner(config, model, teachers)
    module = TrainModule(model, aligner).to(dist_info.device)
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if config.model.compile:
        compile_for_training(module)
    groups = module_groups(model, aligner)
    oc = config.optim
    param_groups = apply_stage(
        stage,
        module,
        groups,
        oc.lr,
        oc.lr_scale,
        frozen=oc.frozen,
        frozen_modules=lower_llm_modules(model, oc.frozen_llm_layers),
        unfrozen=oc.unfrozen,
    )
    log_parameter_counts(stage, groups)
    torch.manual_seed(tc.seed + dist_info.rank)  # per-rank randomness from here on

    loader = build_train_loader(
        config, stage, processor, model.config, teachers, dist_info, log_dir=output_dir
    )
    steps = total_steps(config)
    optimizer, scheduler = build_optimizer(config, param_groups, steps)
    ds_engine, ds_config = None, None
    if use_ds:
        ds_config = deepspeed_config(config, grad_accum, dist_info.world_size)
        ds_engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    trainer = Trainer(
        module,
        optimizer,
        teachers,
        dist_info,
        grad_clip=oc.grad_clip,
        pad_token_id=processor.pad_token_id,
        ds_engine=ds_engine,
        bf16=config.model.dtype == "bfloat16" and not use_ds,
    )

    step = 0
    if resume_from is not None:
        fresh_hparams = [{k: g[k] for k in OPTIM_HPARAMS} for g in optimizer.param_groups]
        step, rank_state = load_checkpoint(
            resume_from,
            dist_info=dist_info,
            module=module,
            optimizer=optimizer,
            scheduler=scheduler,
            ds_engine=ds_engine,
        )
        loader.load_state_dict(rank_state["data"])
        if changed:
            # The optimizer and scheduler restored the old hyper-parameters: put this run's back.
            apply_hparams(optimizer, scheduler, fresh_hparams)
    elif tc.resume == "auto":
        logger.info("--resume auto: no checkpoint in %s, starting fresh", output_dir)
    metrics = MetricsWriter(output_dir, dist_info.is_main, tc.tensorboard, start_step=step)
    logger.info(
        "%d steps of %d samples (micro-batch %d x accumulation %d x %d ranks), from step %d",
        steps,
        tc.global_batch_size,
        tc.micro_batch_size,
        grad_accum,
        dist_info.world_size,
        step,
    )

    module.train()
    progress = tqdm(
        total=steps, initial=step, desc="train", dynamic_ncols=True, disable=not dist_info.is_main
    )
    batches = endless(loader)
    while step < steps:
        t0 = time.perf_counter()
        micro = [_to_device(next(batches), dist_info.device) for _ in range(grad_accum)]
        lr = optimizer.param_groups[0]["lr"]  # the LR this step's update uses
        stats = trainer.train_step(micro)
        scheduler.step()
        step += 1
        if step % tc.log_every == 0 or step == steps:
            record = {
                "step": step,
                "loss": stats.loss,
                "ce_loss": stats.ce_loss,
                "align_loss": stats.align_loss,
                "lr": lr,
                "tokens_per_s": stats.tokens / (time.perf_counter() - t0),
            }
            for name, value in zip(teachers.names, stats.per_teacher):
                record[f"align_loss/{name}"] = value
            metrics.write(record)
        progress.update(1)
        progress.set_postfix(
            loss=f"{stats.loss:.4f}", ce=f"{stats.ce_loss:.4f}", al=f"{stats.align_loss:.4f}"
        )
        if step == steps or (tc.save_every and step % tc.save_every == 0):
            save_checkpoint(
                output_dir,
                step,
                dist_info=dist_info,
                module=module,
                optimizer=optimizer,
                scheduler=scheduler,
                rank_state={"data": loader.state_dict()},
                run_id=run_id,
                config=config_dict,
                ds_engine=ds_engine,
                keep_last=tc.keep_last,
            )
        if tc.stop_after is not None and step >= tc.stop_after:
            logger.info("stopping after step %d (train.stop_after)", step)
            break
    progress.close()
    metrics.close()
    loader.log_summary()

    if step < steps or not config.export.enabled:
        return output_dir
    export_dir = output_dir / config.export.dir
    info = {"run_id": run_id, "stage": stage.name, "step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    export(export_dir, module, processor, ds_engine if zero_stage(ds_config) == 3 else None, dist_info, info)
    return export_dir


def export(
    output: Path,
    module: TrainModule,
    processor: EveProcessor,
    zero3_engine: Any,
    dist_info: DistInfo,
    info: dict[str, Any],
) -> None:
    """save_pretrained (+ tokenizer, processor config), aligner.safetensors + aligner_config.json.

    With LoRA the saved weights have the adapters merged in; when the adapters were all that trained in
    the model, they are also written alone to `adapter/` (peft's format, for the init export).

    Written whole or not at all (`publish_export`: a temporary directory renamed into place, with
    `export.json` = info inside). zero3_engine: the DeepSpeed engine when the weights are ZeRO-3
    shards (gathered onto rank 0 first).
    """
    state = None
    if zero3_engine is not None:
        # Gather the ZeRO-3 shards onto rank 0 (layer by layer, to CPU); every rank must take part.
        state = zero3_engine._zero3_consolidated_16bit_state_dict()
    if dist_info.is_main:

        def write(directory: Path) -> None:
            model_state = None
            if state is not None:
                model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            if lora_layers(module.model):
                model_state = module.model.state_dict() if model_state is None else model_state
                # The adapters alone describe the run only when nothing else in the model trained.
                if only_adapters_train(module.model):
                    save_adapter(module.model, model_state, directory / ADAPTER_DIR)
                # A plain EveForCausalLM: the adapters merged into its weights, no peft needed to load it.
                model_state = merged_state_dict(module.model, model_state)
            module.model.save_pretrained(str(directory), state_dict=model_state)
            processor.save_pretrained(str(directory))
            if module.aligner is not None:
                aligner = module.aligner
                if state is not None:
                    aligner = PatchAligner(module.aligner.config)
                    aligner.load_state_dict(
                        {k[len("aligner.") :]: v for k, v in state.items() if k.startswith("aligner.")}
                    )
                aligner.save(directory)

        publish_export(output, write, info)
        logger.info("exported %s", output)
    barrier()


OPTIM_HPARAMS = ("initial_lr", "betas", "eps", "weight_decay")


def apply_hparams(optimizer: torch.optim.Optimizer, scheduler: Any, hparams: list[dict[str, Any]]) -> None:
    """Set each group's AdamW hyper-parameters and peak LR, and its LR at the scheduler's current step."""
    for group, values in zip(optimizer.param_groups, hparams):
        group.update(values)
    scheduler.base_lrs = [h["initial_lr"] for h in hparams]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)


def endless(loader) -> Iterator[dict[str, torch.Tensor]]:
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


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }
