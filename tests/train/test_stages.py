"""Stages as data: the exact trainable parameter set of each stage, and no gradient into the teacher."""

import pytest
import torch

from tests.train.synthetic import TINY_MODEL, draw
from train.aligning import AlignerConfig, PatchAligner, layers_for
from train.engine import TrainModule
from train.stages import (
    STAGES,
    apply_stage,
    group_parameters,
    log_parameter_counts,
    lower_llm_modules,
    module_groups,
)
from train.teacher import TeacherConfig, build_teachers


@pytest.fixture(scope="module")
def teachers():
    return build_teachers([TeacherConfig(backend="timm", name="efficientnet_lite0", image_size=64)])


def build(teachers):
    from eve import EveConfig, EveForCausalLM

    torch.manual_seed(0)
    model = EveForCausalLM(EveConfig.from_preset("tiny", **TINY_MODEL))
    aligner = PatchAligner(
        AlignerConfig(hidden_size=64, teacher_widths=teachers.widths, layers=layers_for(2, 1), num_heads=8)
    )
    return TrainModule(model, aligner)


def expected_trainable(module, stage):
    """Independent of the handles: by the documented parameter-name prefixes of EveForCausalLM."""
    prefixes = {
        "stage1": ("model.vision_tower.", "aligner."),  # PEL + projector + PAL; LLM frozen
        "stage2": ("model.", "aligner."),  # everything (the teacher is not in the module)
        "sft": ("model.", "aligner."),
    }[stage]
    return {n for n, _ in module.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("stage", ["stage1", "stage2", "sft"])
def test_exact_trainable_set(teachers, stage):
    module = build(teachers)
    groups = module_groups(module.model, module.aligner)
    optim_groups = apply_stage(STAGES[stage], module, groups, lr=1e-3, lr_scale={})
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(module, stage)
    # The optimizer sees exactly the trainable parameters, each once.
    in_optimizer = [p for g in optim_groups for p in g["params"]]
    assert len(in_optimizer) == len({id(p) for p in in_optimizer})
    assert {id(p) for p in in_optimizer} == {id(p) for p in module.parameters() if p.requires_grad}
    names = {g["name"] for g in optim_groups}
    assert names == (
        {"vision", "projector", "aligner"} if stage == "stage1" else {"llm", "vision", "projector", "aligner"}
    )
    # The teacher is never trainable, whatever the stage.
    assert not any(p.requires_grad for p in teachers.parameters())


def test_groups_partition_the_module(teachers):
    module = build(teachers)
    params = group_parameters(module_groups(module.model, module.aligner))
    ids = [id(p) for ps in params.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(module.parameters()))
    # The projector is its own group; "vision" is the rest of the PEL (conv, CA1, CA2, CLS, SPL).
    assert {id(p) for p in params["projector"]} == {
        id(p) for p in module.model.vision_tower.projector.parameters()
    }
    vision = module.model.vision_tower
    assert {id(p) for p in params["vision"]} == {id(p) for p in vision.parameters()} - {
        id(p) for p in vision.projector.parameters()
    }
    assert any(p is vision.class_embedding for p in params["vision"])


def test_per_group_learning_rates(teachers):
    module = build(teachers)
    groups = module_groups(module.model, module.aligner)
    optim_groups = apply_stage(STAGES["sft"], module, groups, lr=2e-5, lr_scale={"aligner": 10.0})
    lrs = {g["name"]: g["lr"] for g in optim_groups}
    assert lrs == pytest.approx({"projector": 2e-5, "vision": 2e-5, "llm": 2e-5, "aligner": 2e-4})
    with pytest.raises(ValueError, match="unknown groups"):
        apply_stage(STAGES["sft"], module, groups, lr=2e-5, lr_scale={"teacher": 1.0})


def test_frozen_groups_and_lower_llm_layers(teachers):
    """optim.frozen and optim.frozen_llm_layers hold exactly the named parameters, by name prefix."""
    module = build(teachers)  # 2 decoder layers
    groups = module_groups(module.model, module.aligner)
    optim_groups = apply_stage(
        STAGES["sft"],
        module,
        groups,
        lr=1e-3,
        lr_scale={},
        frozen=["vision", "projector"],
        frozen_modules=lower_llm_modules(module.model, 1),
    )
    held = ("model.vision_tower.", "model.model.embed_tokens.", "model.model.layers.0.")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n in expected_trainable(module, "sft") if not n.startswith(held)}
    assert any(n.startswith("model.model.layers.1.") for n in trainable)
    assert {"model.lm_head.weight", "model.model.norm.weight"} <= trainable
    assert {g["name"] for g in optim_groups} == {"llm", "aligner"}  # no empty vision/projector group
    assert {id(p) for g in optim_groups for p in g["params"]} == {
        id(p) for p in module.parameters() if p.requires_grad
    }
    assert lower_llm_modules(module.model, 0) == []
    for n in (2, -1):  # all layers frozen is not fine-tuning the LLM; use optim.frozen: [llm]
        with pytest.raises(ValueError, match="frozen_llm_layers"):
            lower_llm_modules(module.model, n)
    with pytest.raises(ValueError, match="optim.frozen names unknown groups"):
        apply_stage(STAGES["sft"], module, groups, lr=1e-3, lr_scale={}, frozen=["teacher"])


def test_parameter_counts_are_logged(teachers, caplog):
    module = build(teachers)
    groups = module_groups(module.model, module.aligner)
    apply_stage(STAGES["stage1"], module, groups, lr=1e-3, lr_scale={})
    with caplog.at_level("INFO", logger="train.stages"):
        counts = log_parameter_counts(STAGES["stage1"], groups)
    assert counts["llm"][0] == 0 and counts["llm"][1] > 0
    assert counts["vision"][0] == counts["vision"][1] > 0
    assert "llm" in caplog.text and "(frozen)" in caplog.text


@pytest.mark.parametrize("stage", ["stage1", "sft"])
def test_no_gradient_reaches_the_teacher(teachers, stage):
    from eve import EveImageProcessor, EveProcessor
    from eve.assets import load_default_tokenizer
    from train.packing import Collator

    module = build(teachers)
    apply_stage(STAGES[stage], module, module_groups(module.model, module.aligner), 1e-3, {})
    processor = EveProcessor.from_config(load_default_tokenizer(), module.model.config, "plain")
    assert isinstance(processor.image_processor, EveImageProcessor)
    samples = []
    for i in range(2):
        image, caption = draw(i)
        enc = processor.encode(
            [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}], image
        )
        view = teachers.views[0]
        enc.update(view.render([image]))
        samples.append(enc)
    batch = Collator(pad_token_id=processor.pad_token_id, num_teacher_views=1)([samples])
    batch["teacher_pixel_values"].requires_grad_(True)  # even a differentiable input must not leak
    outputs = teachers(batch)
    assert not any(f.requires_grad for f, _ in outputs)
    out = module.train()(batch, outputs)
    (out["ce"] + sum(out["align"])).backward()
    assert all(p.grad is None for p in teachers.parameters())
    assert batch["teacher_pixel_values"].grad is None
    assert all(p.grad is not None for p in module.aligner.parameters())  # the PAL itself does learn


@pytest.mark.parametrize("stage", ["eve2_stage0", "eve2_stage1", "stage2", "sft"])
def test_eve2_stage_trainable_sets(stage):
    # EVEv2 stages by parameter name: stage 0 the patch embedding; stage 1 adds every layer's image
    # copies (`.visual.`), never the LLM's own weights; stages 2 and SFT train everything.
    from eve import EveConfig, EveForCausalLM

    torch.manual_seed(0)
    model = EveForCausalLM(
        EveConfig.from_preset("tiny-eve2", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    )
    module = TrainModule(model, None)
    apply_stage(STAGES[stage], module, module_groups(model, None), lr=1e-3, lr_scale={})
    names = [n for n, _ in module.named_parameters()]
    assert any(".visual." in n for n in names)
    want = {
        "eve2_stage0": lambda n: n.startswith("model.vision_tower."),
        "eve2_stage1": lambda n: n.startswith("model.vision_tower.") or ".visual." in n,
        "stage2": lambda n: True,
        "sft": lambda n: True,
    }[stage]
    got = {n for n, p in module.named_parameters() if p.requires_grad}
    assert got == {n for n in names if want(n)}
