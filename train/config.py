"""Run configuration: the typed dataclasses one training run reads, loaded from YAML with dotted
command-line overrides by `eve.config_loader`.

    python train/sft.py --config configs/tiny/sft.yaml --optim.lr 1e-4 --data.max_length=512

Every setting is a declared field with a docstring (`--help` lists them); an unknown key, in a file
or on the command line, is a `ConfigError` that names the key and where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from eve import config_loader
from eve.config_loader import ConfigError as ConfigError  # re-exported: the error of load_config
from eve.config_loader import config_to_dict as config_to_dict  # re-exported for the engine
from train.teacher import TeacherConfig


@dataclass
class ModelConfig:
    """Which model to train and how to build it."""

    preset: str = "tiny"
    """`EveConfig` preset used when a new model is built from an LLM: "tiny", "eve-7b", "eve-7b-hd" (PEL)
    or an encoder front-end ("llava-1.5-7b", "mof-interleaved-7b", "comm-7b", "cambrian-sva-7b",
    "tiny-encoders", "tiny-encoders-mof"; their encoder paths via overrides.vision_encoders)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """`EveConfig` field overrides: on top of the preset for a new model, or of the loaded config of
    `init_path` (e.g. `max_image_size: 1344` for HD fine-tuning of a 672-px model)."""
    init_path: str | None = None
    """Export directory of the previous stage (stage 2: stage 1's `export/`, SFT: stage 2's)."""
    llm_path: str | None = None
    """Stage 1: a Llama/Vicuna directory (or the directory of `gguf_file`). None: a randomly
    initialised LLM of the preset (tiny CPU runs only)."""
    gguf_file: str | None = None
    """GGUF file name inside `llm_path` (e.g. the embedded SmolLM2), or None for safetensors."""
    tokenizer_path: str | None = None
    """Tokenizer directory; None: the init/LLM directory's tokenizer, else the embedded Llama one."""
    attn_implementation: str = "sdpa_packed"
    """transformers attention backend: "sdpa_packed" (eve/attention.py: "sdpa" that runs packed rows per
    sample, exact and fast on any device), "sdpa", "eager" or "flash_attention_2" (varlen on GPU)."""
    gradient_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass (saves memory, costs ~30% time)."""
    compile: bool = False
    """`torch.compile` (dynamic shapes) each decoder layer and each aligning head for training; their
    weights and state-dict keys are unchanged, so checkpoints and exports are the eager model's. The
    first steps pay the compilation (about half a minute for the tiny model on 2 CPU cores)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training precision. "bfloat16": bf16 autocast over fp32 weights (plain loop) or DeepSpeed's bf16
    mode (bf16 weights, fp32 master copy in the optimizer); exports keep the training dtype."""


@dataclass
class StageConfig:
    """Which row of the stage table (train/stages.py) this run is."""

    name: str | None = None
    """"stage1", "stage2", "sft" or "align"; None: the entry script's stage (a different name is an error)."""


@dataclass
class DataConfig:
    """Training data and batching."""

    shards: list[str] = field(default_factory=list)
    """Webdataset tar shards (glob patterns) of image + caption pairs (stages 1-2)."""
    json: str | None = None
    """LLaVA-format JSON (SFT; also accepted for stages 1-2)."""
    image_root: str | None = None
    """Directory that the JSON's relative image paths are resolved against (paths may not escape it)."""
    template: str | None = None
    """Conversation template ("plain", "vicuna_v1"); None: the stage's default."""
    max_length: int = 2048
    """Longest sample in tokens (image tokens included); longer samples are skipped and counted."""
    packing: bool = True
    """Pack several samples per row (attention never crosses samples); False pads each sample."""
    shuffle: bool = True
    """Shuffle samples (seeded by `train.seed`, resumable)."""
    workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""
    window: int = 512
    """Records per length-bucketing and shuffling window (also the granularity of a resumed position)."""
    tokens_per_batch: int | None = None
    """Token budget per micro-batch (rows of max_length) instead of `train.micro_batch_size` samples;
    then `train.grad_accum` must be given and `train.global_batch_size` is not checked."""
    max_samples: int | None = None
    """Use only the first N samples (quick runs)."""
    max_pixels: int | None = 50_000_000
    """Largest source image in pixels, read from its header before decoding; larger ones are skipped
    and counted as `image_too_large` (None: only Pillow's own decompression-bomb limit)."""


@dataclass
class AligningConfig:
    """Patch Aligning Layer (one head per teacher)."""

    layer_step: int = 4
    """Read LLM hidden states every `layer_step` layers: L, L-step, ..., 0."""
    num_heads: int = 8
    """Heads of the cross-layer attention."""
    attn_scale: Literal["official", "head_dim"] = "official"
    """Logit scale of the cross-layer attention: "official" = Ct^-0.5 (teacher width, as EVE's
    aligning layer), "head_dim" = (Ct / num_heads)^-0.5 (SDPA's default, sharper by sqrt(num_heads))."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 4e-4
    """Peak learning rate (after warm-up)."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Per-group multipliers of `lr` ("llm", "vision", "projector", "aligner", "encoders", "lora": the
    LoRA adapters), on top of the stage table."""
    frozen: list[str] = field(default_factory=list)
    """Groups kept frozen although the stage table trains them (e.g. ["vision", "projector"])."""
    unfrozen: list[str] = field(default_factory=list)
    """Groups trained although the stage table freezes them, at multiplier 1 (e.g. ["encoders"]: the
    pretrained encoders of an encoder front-end, frozen in every stage by default)."""
    frozen_llm_layers: int = 0
    """Keep the LLM's input embeddings and its first N decoder layers frozen (0: none); the layers
    above, the final norm and the LM head train as the stage says (with tied input and output
    embeddings the LM head is the frozen embedding matrix)."""
    weight_decay: float = 0.0
    """AdamW weight decay (EVE: 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent in linear warm-up from 0."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    fused: bool = True
    """Use torch's fused AdamW kernel (one kernel for all parameters; ~9x faster than the default
    per-tensor loop on CPU, also on GPU); False: the reference per-tensor implementation."""


@dataclass
class LoraConfig:
    """LoRA: low-rank adapters (peft) trained in place of the LLM's weights."""

    enabled: bool = False
    """Train adapters on the LLM's Linear layers instead of the LLM (stage2, sft): its weights, LM head,
    embeddings and norms stay frozen; the other groups (vision, projector, aligner, ...) train as the
    stage and `optim` say. The export has the adapters merged into the weights; when nothing else in the
    model trains (e.g. `optim.frozen: [vision, projector]`), also alone in `adapter/`, in peft's format."""
    r: int = 8
    """Rank of every adapter: A is (r, in), B is (out, r)."""
    alpha: float = 16.0
    """The adapters' outputs are scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on an adapter's input while training."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers of every decoder layer that get an adapter, by attribute name (default: attention
    and MLP, all of them); layers below `optim.frozen_llm_layers` get none."""


@dataclass
class TrainConfig:
    """The loop: batch sizes, length, checkpoints, distributed."""

    global_batch_size: int = 512
    """Samples per optimizer step over all ranks (= micro_batch_size * grad_accum * world size)."""
    micro_batch_size: int = 4
    """Samples per forward pass on one rank (packed into as few rows as fit when packing)."""
    grad_accum: int | None = None
    """Micro-batches per optimizer step; None: derived from the batch sizes and the world size."""
    max_steps: int | None = None
    """Optimizer steps; None: `epochs` passes over the data."""
    epochs: float = 1.0
    """Passes over the data when `max_steps` is None."""
    seed: int = 0
    """Seed of initialisation, shuffling and every random number of the run."""
    log_every: int = 1
    """Write metrics.jsonl every N steps."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps; the last step always writes one (0: only that one)."""
    keep_last: int = 2
    """Resumable checkpoints of this run kept (its older ones are deleted; other runs' never)."""
    output_dir: str = "runs/demo/stage1"
    """Run directory: metrics.jsonl, checkpoints/, export/."""
    resume: str | None = None
    """"auto": the latest checkpoint in output_dir (if any); a path: that checkpoint; None: start fresh."""
    deepspeed: str | None = None
    """DeepSpeed JSON (configs/deepspeed/zero2.json or zero3.json); None: plain single-process loop."""
    tensorboard: bool = False
    """Also log to TensorBoard (output_dir/tb) when it is installed."""
    stop_after: int | None = None
    """Stop after this many optimizer steps without exporting, as if interrupted (tests, debugging)."""
    overwrite: bool = False
    """Let a fresh run replace another run's work (checkpoints, metrics, export) in output_dir; without
    it such a directory is an error."""
    allow_config_change: bool = False
    """Resume with settings that differ from the checkpoint's (other than length, logging, saving,
    export): applied from the resumed step on, with a warning; without it they are an error."""


@dataclass
class ExportConfig:
    """The final `save_pretrained` directory."""

    enabled: bool = True
    """Export at the end of the run."""
    dir: str = "export"
    """Directory name inside output_dir."""
    answer_instruction: str | None = None
    """Saved with the export's processor: chat, `processor(questions, template=...)` and generation
    helpers append it to a question, so that the model is asked as its SFT data asked it (the demo's
    easy-vqa conversations end every question with the short-answer instruction). None: keep the
    initial export's (none for a new model)."""


@dataclass
class RunConfig:
    """Everything one training run reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model construction."""
    stage: StageConfig = field(default_factory=StageConfig)
    """Stage (row of train/stages.py)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data and batching."""
    teachers: list[TeacherConfig] = field(default_factory=list)
    """Frozen teachers, each with its own aligning head and loss weight (empty: no aligning loss)."""
    aligning: AligningConfig = field(default_factory=AligningConfig)
    """Patch Aligning Layer shape."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters in place of the LLM's weights (off: the stage trains the LLM itself)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Export at the end."""


# ----------------------------------------------------------------------------------------------
# Loading (the machinery is eve.config_loader's)


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None) -> RunConfig:
    """A RunConfig from a YAML file (or the defaults) plus (dotted key, value) overrides."""
    return config_loader.load_config(RunConfig, path, overrides)


def config_from_argv(argv: list[str]) -> RunConfig:
    """Parse `--config X.yaml --section.key value ... [--resume [auto|DIR]]` (`--resume` = `train.resume`)."""
    flags, overrides = config_loader.parse_argv(argv, ("config", "resume"), bare={"resume": "auto"})
    if "resume" in flags:
        overrides.append(("train.resume", flags["resume"]))
    return load_config(flags.get("config"), overrides)


def help_text() -> str:
    """Every run setting with its type, default and docstring (for --help)."""
    return config_loader.help_text(RunConfig)
