"""LoRA fine-tuning: peft low-rank adapters on the LLM's linear layers, whose own weights stay frozen.

add_lora(model, config, first_layer)    # inject the adapters (B = 0: the model's outputs are unchanged)
adapter_modules(model)                  # the adapters' modules: the "lora" group of train/stages.py
lora_stage(stage)                       # a stage row with the adapters trained in the LLM's place
merged_state_dict(model, state)         # the plain model's weights, W + alpha / r * B @ A folded in
only_adapters_train(model)              # whether the adapters alone turn the init export into this one
save_adapter(model, state, directory)   # the adapters alone, in peft's format

An adapted Linear of width in -> out computes x W^T + (alpha / r) * dropout(x) A^T B^T, with A (r, in)
random and B (out, r) zero at the start. Only the decoder's text path is adapted: the LM head, the
embeddings, the norms, EVEv2's visual layer copies, the vision tower and the aligning heads are not;
the ones outside the LLM train (fully) as the stage and `optim` say.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import peft
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from train.config import LoraConfig

if TYPE_CHECKING:  # train.stages groups the adapters through this module
    from train.stages import Stage

logger = logging.getLogger(__name__)

ADAPTER = "default"
"""peft's name of the one adapter (in parameter names: `q_proj.lora_A.default.weight`)."""
ADAPTER_DIR = "adapter"
"""Export subdirectory with the adapters alone (adapter_config.json, adapter_model.safetensors)."""


def target_names(model: nn.Module, targets: list[str], first_layer: int) -> list[str]:
    """Full module names of the Linear layers called `targets` in decoder layers first_layer, ... (text path)."""
    names = {id(m): name for name, m in model.named_modules()}
    found, seen = [], set()
    for layer in model.model.layers[first_layer:]:
        # EVEv2's visual copies carry the same names; they are the "visual" group, trained as a whole.
        visual = {id(m) for m in layer.visual.modules()} if hasattr(layer, "visual") else set()
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in targets and isinstance(module, nn.Linear) and id(module) not in visual:
                found.append(names[id(module)])
                seen.add(leaf)
    missing = sorted(set(targets) - seen)
    if missing:
        last = model.model.layers[-1]
        have = sorted({n.rsplit(".", 1)[-1] for n, m in last.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora.target_modules {missing}: no such Linear in the decoder layers; they have {have}"
        )
    return found


def add_lora(model: nn.Module, config: LoraConfig, first_layer: int = 0) -> list[str]:
    """Inject LoRA adapters into the LLM's target Linears of layers first_layer, ... (in place); their names."""
    if config.r < 1 or not config.target_modules or not 0.0 <= config.dropout < 1.0:
        raise ValueError(
            f"lora: r={config.r}, target_modules={config.target_modules}, dropout={config.dropout}: "
            "r must be >= 1, target_modules non-empty and dropout in [0, 1)"
        )
    names = target_names(model, config.target_modules, first_layer)
    lora = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=names,  # full names: nothing outside the decoder's text path matches
        bias="none",
    )
    peft.inject_adapter_in_model(lora, model, adapter_name=ADAPTER)
    n = sum(p.numel() for m in adapter_modules(model) for p in m.parameters())
    logger.info(
        "LoRA r=%d alpha=%g on %d Linear layers: %s adapter parameters",
        config.r,
        config.alpha,
        len(names),
        f"{n:,}",
    )
    return names


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Module name -> adapted Linear (empty for a model without adapters)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    """The A and B matrices of every adapter (the "lora" group; their base Linears stay in "llm")."""
    return [part for layer in lora_layers(model).values() for part in (layer.lora_A, layer.lora_B)]


def lora_stage(stage: Stage) -> Stage:
    """The stage with the adapters ("lora") trained at the LLM's multiplier and the LLM itself frozen."""
    if "llm" not in stage.trainable:
        raise ValueError(
            f"lora.enabled: stage {stage.name!r} keeps the LLM frozen, so its adapters would not train; "
            "use LoRA in a stage that trains the LLM (stage2, sft)"
        )
    trainable = {("lora" if name == "llm" else name): scale for name, scale in stage.trainable.items()}
    return dataclasses.replace(stage, trainable=trainable)


def merged_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The weights of the model without adapters: each adapted W becomes W + scaling * B @ A.

    state: the model's state dict (e.g. gathered from ZeRO-3 shards); None: model.state_dict(). The
    result has the plain model's names (`q_proj.weight`), so that EveForCausalLM loads it without peft.
    """
    state = dict(model.state_dict() if state is None else state)
    for name, layer in lora_layers(model).items():
        a = state.pop(f"{name}.lora_A.{ADAPTER}.weight")  # (r, in)
        b = state.pop(f"{name}.lora_B.{ADAPTER}.weight")  # (out, r)
        w = state.pop(f"{name}.base_layer.weight")  # (out, in)
        # In fp32 whatever the training dtype, rounded once at the end.
        state[f"{name}.weight"] = (w.float() + layer.scaling[ADAPTER] * (b.float() @ a.float())).to(w.dtype)
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


def only_adapters_train(model: nn.Module) -> bool:
    """Whether nothing but the adapters trains in the model (the aligning heads are not part of it)."""
    adapters = {id(p) for m in adapter_modules(model) for p in m.parameters()}
    return all(id(p) in adapters for p in model.parameters() if p.requires_grad)


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors: `PeftModel.from_pretrained(base, directory)` applies them."""
    adapter = peft.get_peft_model_state_dict(model, state, adapter_name=ADAPTER, save_embedding_layers=False)
    directory.mkdir(parents=True, exist_ok=True)
    # PeftModel's own prefix (it wraps the base model as base_model.model).
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in adapter.items()},
        directory / "adapter_model.safetensors",
    )
    model.peft_config[ADAPTER].save_pretrained(str(directory))
