"""`model.compile`: compiled decoder layers and aligning heads train exactly as the eager ones."""

import pytest
import torch

from tests.train.test_engine import _samples_and_module
from train.build import compile_for_training
from train.distributed import DistInfo
from train.engine import Trainer
from train.packing import Collator, DummyImage
from train.teacher import TeacherConfig, build_teachers


def _two_steps(compiled: bool, teachers, dist_info):
    module, processor, samples = _samples_and_module(teachers)
    keys = list(module.state_dict())
    if compiled:
        compile_for_training(module)
    collate = Collator(
        pad_token_id=processor.pad_token_id,
        packing=True,
        num_teacher_views=1,
        dummy_image=DummyImage.from_config(module.model.config, [64]),
    )
    # Two packed batches of different lengths: the second step runs the dynamic-shape graph.
    batches = [collate([[samples[0], samples[1], samples[2]]]), collate([[samples[3], samples[1]]])]
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    trainer = Trainer(module, optimizer, teachers, dist_info, grad_clip=0.0)
    stats = [trainer.train_step([b]) for b in batches]
    return stats, keys, module.state_dict()


@pytest.mark.slow
def test_compiled_training_equals_eager():
    teachers = build_teachers([TeacherConfig(backend="timm", name="efficientnet_lite0", image_size=64)])
    dist_info = DistInfo(0, 1, 0, torch.device("cpu"))
    eager, keys, eager_state = _two_steps(False, teachers, dist_info)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled, compiled_keys, compiled_state = _two_steps(True, teachers, dist_info)
    assert counters["stats"]["unique_graphs"] >= 2  # a layer graph and a head graph ran compiled
    # Exports and checkpoints see the eager module's names (no "_orig_mod." prefixes).
    assert list(compiled_state) == compiled_keys == keys
    # fp32; inductor fuses the norms, RoPE and the MLP's elementwise ops and may reorder their sums:
    # differences of a few fp32 ulps per op, ~1e-6 relative after two layers. 1e-4 bounds it with room,
    # while a wrong graph (a missed mask, a dropped residual) moves the loss by whole percent.
    for a, b in zip(eager, compiled):
        assert b.ce_loss == pytest.approx(a.ce_loss, rel=1e-4)
        assert b.align_loss == pytest.approx(a.align_loss, rel=1e-4)
    # The first step's update went through the compiled backward: the weights after two steps agree.
    for name, value in eager_state.items():
        err = (compiled_state[name] - value).abs().max().item()
        assert err <= 1e-4 * value.abs().max().item() + 1e-7, (name, err)
