"""Training an encoder front-end: the stage table's groups by parameter name, and the dummy image."""

import pytest
import torch

from tests.train.synthetic import TINY_MODEL
from train.engine import TrainModule
from train.packing import Collator, DummyImage
from train.stages import STAGES, apply_stage, module_groups


@pytest.fixture(scope="module")
def module():
    """The tiny-encoders preset (embedded efficientnet-lite0 + mlp2x_gelu) on the tiny test LLM."""
    from eve import EveConfig, EveForCausalLM

    llm = {k: v for k, v in TINY_MODEL.items() if not k.startswith(("vision_", "max_image"))}
    torch.manual_seed(0)
    return TrainModule(EveForCausalLM(EveConfig.from_preset("tiny-encoders", **llm)), None)


# Independent of the handles: by parameter-name prefixes. The connector trains where the PEL and its
# projector would; the pretrained encoders train in no stage unless optim.unfrozen names them.
CONNECTOR, ENCODERS, LLM = (
    "model.vision_tower.connector.",
    "model.vision_tower.encoders.",
    ("model.model.", "model.lm_head."),
)
EXPECTED = {
    "align": (CONNECTOR,),
    "stage1": (CONNECTOR,),
    "stage2": (CONNECTOR, *LLM),
    "sft": (CONNECTOR, *LLM),
}


@pytest.mark.parametrize("stage", list(EXPECTED))
@pytest.mark.parametrize("unfrozen", [[], ["encoders"]])
def test_exact_trainable_set(module, stage, unfrozen):
    groups = module_groups(module.model, None)
    optim_groups = apply_stage(STAGES[stage], module, groups, lr=1e-3, lr_scale={}, unfrozen=unfrozen)
    prefixes = EXPECTED[stage] + ((ENCODERS,) if unfrozen else ())
    names = [n for n, _ in module.named_parameters()]
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        n for n in names if n.startswith(prefixes)
    }
    assert any(n.startswith(ENCODERS) for n in names) and groups["vision"] == []
    assert {id(p) for g in optim_groups for p in g["params"]} == {
        id(p) for p in module.parameters() if p.requires_grad
    }
    assert STAGES["align"].losses == ("ce",)  # LLaVA's alignment has no aligning loss (no teachers built)


def test_dummy_image_runs_the_connector_in_a_text_only_batch(module):
    """A text-only micro-batch gets one zero row of the encoders' views, T positions, no supervised token:
    the loss is the text's alone, yet every connector parameter is in the graph (ZeRO-3 lockstep)."""
    model = module.model
    dummy = DummyImage.from_config(model.config, teacher_sizes=[])
    tokens = model.vision_tower.num_tokens  # 8 x 8 stride-16 map of a 128-px view
    sample = dummy.sample()
    assert dummy.num_tokens == tokens == 64 and sample["image_grid_hw"].tolist() == [[1, 64]]
    assert sample["pixel_values"].shape == (1, 3 * 128 * 128)
    text = {"input_ids": [1, 22172, 3303, 450], "labels": [-100, 22172, 3303, 450]}
    apply_stage(STAGES["sft"], module, module_groups(model, None), lr=1e-3, lr_scale={})
    with_dummy = Collator(dummy_image=dummy)([[text]])
    plain = Collator()([[text]])
    module.zero_grad(set_to_none=True)
    reference = model(**plain, use_cache=False).loss
    reference.backward()
    assert all(p.grad is None for p in model.vision_tower.connector.parameters())  # what the dummy is for
    loss = model(**with_dummy, use_cache=False).loss
    loss.backward()
    # The dummy is its own packed segment with no target: the same text loss (fp32, ~1 ulp of summation order).
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=0)
    assert all(p.grad is not None for p in model.vision_tower.connector.parameters())
