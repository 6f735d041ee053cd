"""LoRA fine-tuning: what trains, the starting point, the merged export, frozen base weights, resume."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from tests.train.synthetic import draw, losses, tiny_run_config, write_llava_json, write_yaml
from train.build import build_model
from train.checkpointing import list_checkpoints
from train.cli import run_stage
from train.config import LoraConfig, load_config
from train.lora import ADAPTER_DIR, add_lora, lora_stage, only_adapters_train
from train.stages import STAGES, apply_stage, get_stage, module_groups

# The tiny model (tests/conftest.py): width 64, MLP 128, 4 heads of 16, 2 KV heads (k, v: 64 -> 32).
# An adapter on an in -> out Linear holds A (r, in) and B (out, r): r * (in + out) parameters.
IN_OUT = {
    "q_proj": (64, 64),
    "k_proj": (64, 32),
    "v_proj": (64, 32),
    "o_proj": (64, 64),
    "gate_proj": (64, 128),
    "up_proj": (64, 128),
    "down_proj": (128, 64),
}
PER_LAYER = sum(i + o for i, o in IN_OUT.values())  # 1024 per unit of rank


def sample_batch(processor) -> dict[str, torch.Tensor]:
    """One image question and one text-only question (left-padded), as the model's forward takes them."""
    image, _ = draw(5)
    prompts = [
        processor.build_prompt("What colour is the shape?", has_image=True),
        processor.build_prompt("Hi", has_image=False),
    ]
    return dict(processor(prompts, [image, None]))


@pytest.mark.parametrize("first_layer", [0, 1])
def test_only_adapters_and_the_stage_groups_train(tiny_model, first_layer):
    """SFT with LoRA: the adapters (r * (in + out) each) and the vision tower train, no LLM weight does."""
    r = 4
    add_lora(tiny_model, LoraConfig(enabled=True, r=r), first_layer=first_layer)
    groups = module_groups(tiny_model, None)
    optim_groups = apply_stage(lora_stage(STAGES["sft"]), tiny_model, groups, lr=1e-3, lr_scale={})

    n_layers = 2 - first_layer
    lora_trainable = sum(p.numel() for g in optim_groups if g["name"] == "lora" for p in g["params"])
    assert lora_trainable == n_layers * r * PER_LAYER == {0: 8192, 1: 4096}[first_layer]
    # Everything else that trains is the vision tower (the PEL and its projector), all of it.
    vision = {id(p) for p in tiny_model.vision_tower.parameters()}
    adapters = {id(p) for g in optim_groups if g["name"] == "lora" for p in g["params"]}
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert trainable == adapters | vision
    assert {g["name"] for g in optim_groups} == {"lora", "vision", "projector"}
    frozen_llm = [n for n, p in tiny_model.named_parameters() if id(p) not in adapters | vision]
    assert any(n.endswith("q_proj.base_layer.weight") for n in frozen_llm)
    assert any(n.startswith("lm_head") for n in frozen_llm)
    # The vision tower trains: the adapters alone would not describe the run (no `adapter/` export).
    assert not only_adapters_train(tiny_model)
    apply_stage(lora_stage(STAGES["sft"]), tiny_model, groups, 1e-3, {}, frozen=["vision", "projector"])
    assert only_adapters_train(tiny_model)


def test_lora_needs_a_stage_that_trains_the_llm():
    with pytest.raises(ValueError, match="keeps the LLM frozen"):
        lora_stage(get_stage("stage1"))


def test_unknown_target_module_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="qkv_proj"):
        add_lora(tiny_model, LoraConfig(enabled=True, target_modules=["q_proj", "qkv_proj"]))


@torch.no_grad()
def test_adapters_start_as_the_identity(tiny_model, processor):
    """B = 0 at the start: the adapted model's logits are bitwise those of the base model."""
    base = copy.deepcopy(tiny_model)
    add_lora(tiny_model, LoraConfig(enabled=True, r=4))
    batch = sample_batch(processor)
    # Each adapted Linear adds exact zeros (B @ A x with B = 0) to the same base product.
    assert torch.equal(tiny_model(**batch).logits, base(**batch).logits)


def lora_sft_tree(tmp_path, init, name: str, **train) -> dict:
    """A 4-step LoRA SFT run of the tiny model from `init` on the synthetic LLaVA JSON (lr: large enough
    for the adapters to move in 4 steps)."""
    sft = write_llava_json(tmp_path / "sft", n_samples=12)
    return tiny_run_config(
        tmp_path,
        "sft",
        data={"json": str(sft), "image_root": str(tmp_path / "sft"), "packing": False, "window": 4},
        model={"init_path": str(init)},
        lora={"enabled": True, "r": 4, "alpha": 8.0},
        # The tiny SFT's freezing (configs/tiny/sft_lora.yaml): in the model only the adapters train.
        optim={"lr": 1e-2, "warmup_ratio": 0.0, "frozen": ["vision", "projector"]},
        train={
            "max_steps": 4,
            "save_every": 2,
            "output_dir": str(tmp_path / name),
            "micro_batch_size": 2,
            "global_batch_size": 2,
        },
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_checkpoint):
    """(tmp, config file, export directory) of an uninterrupted 4-step LoRA SFT run."""
    tmp = tmp_path_factory.mktemp("lora")
    config_file = write_yaml(tmp / "ref.yaml", lora_sft_tree(tmp, tiny_checkpoint, "ref"))
    export = run_stage("sft", ["--config", config_file])
    return tmp, config_file, export


def trained_peft_model(config_file: str, run_dir):
    """The run's LoRA model as it was in memory at its last step: rebuilt, its last checkpoint loaded."""
    model, processor = build_model(load_config(config_file), get_stage("sft"))
    state = torch.load(list_checkpoints(run_dir)[-1] / "train_state.pt", weights_only=True)["model"]
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    return model.eval(), processor


@torch.no_grad()
def test_merged_export_equals_the_peft_model(lora_run, tiny_checkpoint):
    """The export loads without peft and gives the logits of the trained adapters on the base weights."""
    from peft import PeftModel

    from eve import EveForCausalLM

    tmp, config_file, export = lora_run
    peft_model, processor = trained_peft_model(config_file, tmp / "ref")
    merged = EveForCausalLM.from_pretrained(export).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    batch = sample_batch(processor)
    want = peft_model(**batch).logits
    # x (W + s B A)^T against x W^T + s (x A^T) B^T in fp32: the same sum rounded in another order, a
    # few ulps of the logits (|logits| < 1; measured 4e-7). 1e-5 is 10^5 below the adapters' effect.
    torch.testing.assert_close(merged(**batch).logits, want, atol=1e-5, rtol=1e-5)
    base = EveForCausalLM.from_pretrained(tiny_checkpoint).eval()
    assert (base(**batch).logits - want).abs().max() > 0.1  # the adapters did change the model

    # Only the adapters trained in the model: alone, applied by peft to the init export, they give it too.
    adapted = PeftModel.from_pretrained(EveForCausalLM.from_pretrained(tiny_checkpoint), export / ADAPTER_DIR)
    torch.testing.assert_close(adapted.eval()(**batch).logits, want, atol=1e-5, rtol=1e-5)


def test_base_weights_do_not_change(lora_run, tiny_checkpoint):
    """After training (not merged), every weight under the adapters is the init export's, bit for bit."""
    tmp, config_file, _ = lora_run
    peft_model, _ = trained_peft_model(config_file, tmp / "ref")
    init = load_file(tiny_checkpoint / "model.safetensors")
    params = dict(peft_model.named_parameters())
    base = {n.replace(".base_layer", ""): p for n, p in params.items() if ".lora_" not in n}
    assert sorted(base) == sorted(init)
    for name, p in base.items():
        assert torch.equal(p, init[name]), name
    trained_b = [p for n, p in params.items() if ".lora_B." in n]
    assert len(trained_b) == 14 and all(p.abs().max() > 0 for p in trained_b)  # B = 0: did not train


def test_resume_equals_uninterrupted(lora_run, tiny_checkpoint):
    """Stop after step 3 (last checkpoint: step 2), resume: the LoRA run's losses are the reference's."""
    tmp, config_file, _ = lora_run
    run_file = write_yaml(tmp / "run.yaml", lora_sft_tree(tmp, tiny_checkpoint, "run"))
    run_stage("sft", ["--config", run_file, "--train.stop_after", "3"])
    run_stage("sft", ["--config", run_file, "--resume"])
    # Same ops on the same inputs in the same order (one process, fixed thread count): bitwise equal.
    assert losses(tmp / "run") == losses(tmp / "ref")
