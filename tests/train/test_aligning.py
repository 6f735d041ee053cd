"""Patch Aligning Layer: pooling, loss values, layer selection, save/load."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.aligning import (
    AlignerConfig,
    PatchAligner,
    apply_pooling,
    cosine_alignment_loss,
    layers_for,
    pooling_plan,
    valid_grid,
)


def test_layers_for():
    assert layers_for(32, 4) == [32, 28, 24, 20, 16, 12, 8, 4, 0]
    assert layers_for(2, 1) == [2, 1, 0]
    assert layers_for(30, 4) == [30, 26, 22, 18, 14, 10, 6, 2]


def test_pooling_hand_checked():
    # One 2x4 student grid (values 0..7 in raster order) onto a 1x2 valid grid inside a 2x3 teacher grid:
    # bins are rows {0,1} x cols {0,1} and {2,3}: means (0+1+4+5)/4 = 2.5 and (2+3+6+7)/4 = 4.5.
    x = torch.arange(8.0)[:, None]
    plan = pooling_plan(torch.tensor([[2, 4]]), torch.tensor([[1, 2]]), (2, 3))
    assert apply_pooling(x, plan)[:, 0].tolist() == [2.5, 4.5]
    assert plan.teacher_index.tolist() == [0, 1]  # (0,0) and (0,1) of the 2x3 teacher grid


@pytest.mark.parametrize(
    "grids", [[(4, 6), (3, 5)], [(48, 30), (24, 15)], [(5, 3), (6, 4)], [(7, 7), (3, 2)]]
)
def test_pooling_equals_adaptive_avg_pool(grids):
    # Independent reference: torch's adaptive_avg_pool2d per image; fp32 sums of <= 9 terms: 1e-6.
    (h, w), (vh, vw) = grids
    torch.manual_seed(0)
    a, b = torch.randn(h * w, 5), torch.randn(2 * 3, 5)
    plan = pooling_plan(torch.tensor([[h, w], [2, 3]]), torch.tensor([[vh, vw], [1, 1]]), (vh + 1, vw + 1))
    out = apply_pooling(torch.cat([a, b]), plan)
    ref_a = F.adaptive_avg_pool2d(a.T.reshape(1, 5, h, w), (vh, vw)).reshape(5, -1).T
    ref_b = b.mean(0, keepdim=True)
    torch.testing.assert_close(out, torch.cat([ref_a, ref_b]), atol=1e-6, rtol=1e-6)


def test_valid_grid():
    valid = torch.zeros(2, 3, 4, dtype=torch.bool)
    valid[0, :2, :3] = True
    assert valid_grid(valid).tolist() == [[2, 3], [0, 0]]


def test_cosine_loss_hand_computed_2x2():
    # Image 0 has a 2x2 valid grid: cosines 1, 0, -1, cos(45deg) -> mean (1 + 0 - 1 + 0.7071) / 4.
    # Image 1 has one patch with cosine 1 -> loss 0. Batch loss = mean of the two image losses.
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    target = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [1.0, 1.0], [6.0, 8.0]])
    image = torch.tensor([0, 0, 0, 0, 1])
    expected = ((1 - (1 + 0 - 1 + math.sqrt(0.5)) / 4) + 0.0) / 2
    got = cosine_alignment_loss(pred, target, image, num_images=3)  # image 2 has no patch: excluded
    assert abs(got.item() - expected) < 1e-6  # fp32 cosine: ~1e-7 error


def _aligner(d=16, ct=8, layers=(2, 1, 0)):
    torch.manual_seed(0)
    return PatchAligner(AlignerConfig(hidden_size=d, teacher_widths=[ct], layers=list(layers)))


def test_loss_zero_when_prediction_equals_teacher():
    # Build the teacher features *from* the aligner's own prediction on pooled hidden states,
    # so that prediction == teacher feature on every valid patch: loss must be 0 (fp32: 1e-6).
    al = _aligner()
    grids = torch.tensor([[4, 6], [2, 2]])
    n_tok = int((grids[:, 0] * grids[:, 1]).sum())
    hidden = [torch.randn(n_tok, 16) for _ in range(3)]
    valid = torch.zeros(2, 3, 3, dtype=torch.bool)
    valid[0, :2, :3] = True  # image 0: 4x6 student -> 2x3 valid (factor 2, as in HD)
    valid[1, :1, :1] = True
    plan = pooling_plan(grids, valid_grid(valid), (3, 3))
    with torch.no_grad():
        pred = al.heads[0]([apply_pooling(h, plan) for h in hidden])
    feats = torch.randn(2, 3, 3, 8)  # invalid patches hold noise: they must be ignored
    feats.view(-1, 8)[plan.teacher_index] = pred
    total, per = al(hidden, grids, [(feats, valid)])
    assert abs(total.item()) < 1e-6 and abs(per[0].item()) < 1e-6
    feats.view(-1, 8)[plan.teacher_index] = -pred  # opposite direction: loss 2
    assert abs(al(hidden, grids, [(feats, valid)])[0].item() - 2.0) < 1e-5


def test_cross_layer_attention_matches_manual():
    # Reference: the head computed by hand with explicit softmax over the other layers per token.
    al = _aligner(d=16, ct=16)
    head = al.heads[0]
    hidden = [torch.randn(5, 16) for _ in range(3)]
    z = [proj(norm(h)) for h, norm, proj in zip(hidden, head.norms, head.projs)]
    q = z[0].view(5, 8, 2)
    k = torch.stack(z[1:], 1).view(5, 2, 8, 2)  # (M, layers, heads, hd)
    att = torch.einsum("mhd,mlhd->mhl", q, k) / math.sqrt(2)
    out = torch.einsum("mhl,mlhd->mhd", att.softmax(-1), k).reshape(5, 16)
    ref = head.skip(hidden[0]) + head.out(out)
    torch.testing.assert_close(head(hidden), ref, atol=1e-5, rtol=1e-5)  # fp32 reassociation


def test_dummy_only_batch_gives_zero_loss_with_graph():
    al = _aligner()
    hidden = [torch.randn(1, 16, requires_grad=True) for _ in range(3)]
    valid = torch.zeros(1, 2, 2, dtype=torch.bool)  # a dummy image: no valid teacher patch
    total, _ = al(hidden, torch.tensor([[1, 1]]), [(torch.zeros(1, 2, 2, 8), valid)])
    assert total.item() == 0.0
    total.backward()  # graph is connected: every rank runs the same backward under ZeRO-3


def test_multi_teacher_weights_and_save_load(tmp_path):
    torch.manual_seed(0)
    cfg = AlignerConfig(hidden_size=16, teacher_widths=[8, 16], layers=[2, 0], loss_weights=[1.0, 0.5])
    al = PatchAligner(cfg)
    grids = torch.tensor([[2, 2]])
    hidden = [torch.randn(4, 16) for _ in range(2)]
    outs = [(torch.randn(1, 2, 2, 8), torch.ones(1, 2, 2, dtype=torch.bool))]
    outs.append((torch.randn(1, 1, 1, 16), torch.ones(1, 1, 1, dtype=torch.bool)))
    total, per = al(hidden, grids, outs)
    assert abs(total.item() - (per[0] + 0.5 * per[1]).item()) < 1e-6
    al.save(tmp_path)
    again = PatchAligner.load(tmp_path)
    assert abs(again(hidden, grids, outs)[0].item() - total.item()) < 1e-6
