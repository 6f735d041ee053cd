"""The three EVE stages as data (docs/stages.md), and freezing / grouping through module handles.

A stage names which module groups train and each group's learning-rate multiplier; the groups are
resolved from the model's own submodules (`module_groups`), never from parameter-name substrings.
The teacher is never a group: it lives outside the trained module and is always frozen. The encoder
front-end maps onto the same groups: its connector trains where the PEL's projector would, and its
pretrained encoders are a group of their own that no stage trains (`optim.unfrozen: [encoders]` does).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from eve.vision_frontends import EncoderFrontend
from train.lora import adapter_modules

logger = logging.getLogger(__name__)


GROUPS = ("llm", "visual", "vision", "projector", "aligner", "encoders", "lora")
"""Every trained parameter belongs to exactly one of these groups."""


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str
    """Key in STAGES and the value of `stage.name` in the YAML."""
    title: str
    """What the paper calls it."""
    trainable: Mapping[str, float]
    """Trainable group -> learning-rate multiplier (of `optim.lr`); groups not listed are frozen."""
    template: str
    """Default conversation template."""
    previous: str | None
    """Stage whose export this one starts from (None: starts from an LLM)."""
    make_target: str | None
    """`make` target that runs this stage (named in 'run it first' errors); None: its entry script only."""
    losses: tuple[str, ...] = field(default=("ce", "align"))
    """Loss terms: LM cross-entropy and the patch-aligning loss (on in EVE's three stages)."""


def _stage(name, title, trainable, template, previous, make_target, losses=("ce", "align")) -> Stage:
    return Stage(name, title, MappingProxyType(dict(trainable)), template, previous, make_target, losses)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        _stage(
            "stage1",
            "LLM-guided pre-aligning",
            {"vision": 1.0, "projector": 1.0, "aligner": 1.0},  # LLM frozen
            "plain",
            None,
            "pretrain-stage1",
        ),
        _stage(
            "stage2",
            "generative pre-training",
            {"llm": 1.0, "visual": 1.0, "vision": 1.0, "projector": 1.0, "aligner": 1.0},
            "plain",
            "stage1",
            "pretrain-stage2",
        ),
        _stage(
            "sft",
            "supervised fine-tuning",
            {"llm": 1.0, "visual": 1.0, "vision": 1.0, "projector": 1.0, "aligner": 1.0},
            "vicuna_v1",
            "stage2",
            "sft",
        ),
        # LLaVA-1.5's stage 1 for an encoder front-end: the connector alone (LLaVA: LR 1e-3), no aligning.
        _stage("align", "connector alignment", {"projector": 1.0}, "plain", None, None, ("ce",)),
        # EVEv2 (modality layers, `visual` = every layer's image copies): stage 0 trains the patch
        # embedding alone, stage 1 adds the visual copies (1.0 and 1.1 differ in data and resolution
        # only); its stage 2 and SFT are the rows above (everything trains). No aligning loss in EVEv2.
        _stage(
            "eve2_stage0",
            "EVEv2 patch embedding",
            {"vision": 1.0, "projector": 1.0},
            "plain",
            None,
            None,
            ("ce",),
        ),
        _stage(
            "eve2_stage1",
            "EVEv2 vision layers",
            {"vision": 1.0, "projector": 1.0, "visual": 1.0},
            "plain",
            "eve2_stage0",
            None,
            ("ce",),
        ),
    )
}


def get_stage(name: str) -> Stage:
    """The stage called `name`, or a ValueError listing the stages."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
    return STAGES[name]


def module_groups(model: nn.Module, aligner: nn.Module | None) -> dict[str, list[nn.Module]]:
    """Group -> module handles of an EveForCausalLM and its aligning heads.

    projector: the PEL -> LLM MLP, or an encoder front-end's connector; vision: the rest of the patch
    embedding layer (conv, CA1, CLS + CA2, SPL); encoders: an encoder front-end's pretrained encoders;
    visual: the image copies of EVEv2's decoder layers; lora: the LoRA adapters inside the decoder (none
    unless `lora.enabled`); llm: the rest of the decoder (embeddings, layers, final norm) and the LM
    head; aligner: every teacher's PAL head. A parameter belongs to the first group that reaches it,
    which is why the projector (a submodule of the vision tower) is listed before the vision tower.
    """
    tower = model.vision_tower
    if isinstance(tower, EncoderFrontend):
        vision = {"projector": [tower.connector], "vision": [], "encoders": [tower.encoders]}
    else:
        vision = {"projector": [tower.projector], "vision": [tower], "encoders": []}
    return {
        **vision,
        # listed before llm, which holds them: the image copies of a modality-split decoder (EVEv2)
        "visual": [layer.visual for layer in model.model.layers if hasattr(layer, "visual")],
        "lora": adapter_modules(model),  # inside llm too, so listed before it
        "llm": [model.model, model.lm_head],
        "aligner": [aligner] if aligner is not None else [],
    }


def group_parameters(groups: dict[str, list[nn.Module]]) -> dict[str, list[nn.Parameter]]:
    """Group -> its parameters (deduplicated: tied weights are counted once, in the first group)."""
    seen: set[int] = set()
    out: dict[str, list[nn.Parameter]] = {}
    for name, modules in groups.items():
        params = []
        for module in modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        out[name] = params
    return out


def lower_llm_modules(model: nn.Module, n_layers: int) -> list[nn.Module]:
    """The LLM's input embeddings and its first `n_layers` decoder layers (what `optim.frozen_llm_layers`
    keeps frozen); n_layers 0 freezes nothing."""
    if n_layers == 0:
        return []
    layers = model.model.layers
    if not 0 < n_layers < len(layers):
        raise ValueError(
            f"optim.frozen_llm_layers={n_layers}: the LLM has {len(layers)} decoder layers; "
            f"freeze 0 to {len(layers) - 1} of them"
        )
    return [model.model.embed_tokens, *layers[:n_layers]]


def apply_stage(
    stage: Stage,
    trained: nn.Module,
    groups: dict[str, list[nn.Module]],
    lr: float,
    lr_scale: Mapping[str, float],
    frozen: tuple[str, ...] | list[str] = (),
    frozen_modules: list[nn.Module] | tuple[nn.Module, ...] = (),
    unfrozen: tuple[str, ...] | list[str] = (),
) -> list[dict]:
    """Freeze what the stage freezes; return AdamW parameter groups (one per trainable group).

    `frozen` names groups to keep frozen on top of the stage table, `unfrozen` groups to train although
    the table freezes them (multiplier 1, e.g. "encoders"), and `frozen_modules` are modules kept frozen
    inside trained groups (`lower_llm_modules`); a group left with nothing to train is not in the
    optimizer. Every parameter of `trained` must fall in a group, so that nothing trains or freezes by
    accident.
    """
    options = (
        ("optim.lr_scale", set(lr_scale)),
        ("optim.frozen", set(frozen)),
        ("optim.unfrozen", set(unfrozen)),
    )
    for option, names in options:
        unknown = names - set(GROUPS)
        if unknown:
            raise ValueError(f"{option} names unknown groups {sorted(unknown)}; groups are {list(GROUPS)}")
    params = group_parameters(groups)
    grouped = {id(p) for ps in params.values() for p in ps}
    stray = [n for n, p in trained.named_parameters() if id(p) not in grouped]
    if stray:
        raise ValueError(f"parameters outside every group (add their module to module_groups): {stray[:5]}")
    trained.requires_grad_(False)
    held = {id(p) for module in frozen_modules for p in module.parameters()}
    trainable = {**dict.fromkeys(unfrozen, 1.0), **stage.trainable}
    optim_groups = []
    for name, ps in params.items():
        ps = [p for p in ps if id(p) not in held]
        if name in trainable and name not in frozen and ps:
            for p in ps:
                p.requires_grad_(True)
            scale = trainable[name] * lr_scale.get(name, 1.0)
            optim_groups.append({"params": ps, "lr": lr * scale, "name": name})
    return optim_groups


def log_parameter_counts(stage: Stage, groups: dict[str, list[nn.Module]]) -> dict[str, tuple[int, int]]:
    """Log (and return) group -> (trainable, total) parameter counts."""
    counts = {}
    for name, ps in group_parameters(groups).items():
        counts[name] = (sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps))
    logger.info("stage %s (%s): trainable parameters per group", stage.name, stage.title)
    for name, (trainable, total) in counts.items():
        logger.info(
            "  %-10s %14s / %14s %s", name, f"{trainable:,}", f"{total:,}", "" if trainable else "(frozen)"
        )
    total_trainable = sum(t for t, _ in counts.values())
    logger.info(
        "  %-10s %14s / %14s", "total", f"{total_trainable:,}", f"{sum(n for _, n in counts.values()):,}"
    )
    return counts


def frozen_check(module: nn.Module) -> None:
    """Raise if any parameter of `module` (a teacher) could receive a gradient."""
    live = [n for n, p in module.named_parameters() if p.requires_grad]
    if live:
        raise RuntimeError(f"teacher parameters must be frozen, found trainable: {live[:5]}")
