"""Patch Aligning Layer: pooling, loss values, layer selection, save/load, and parity with EVE's formula."""

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
    valid_boxes,
)
from train.teacher import Teacher, TeacherConfig, TeacherView


def test_layers_for():
    assert layers_for(32, 4) == [32, 28, 24, 20, 16, 12, 8, 4, 0]
    assert layers_for(2, 1) == [2, 1, 0]
    assert layers_for(30, 4) == [30, 26, 22, 18, 14, 10, 6, 2]


def test_pooling_hand_checked():
    # One 2x4 student grid (values 0..7 in raster order) onto a 1x2 valid grid inside a 2x3 teacher grid:
    # bins are rows {0,1} x cols {0,1} and {2,3}: means (0+1+4+5)/4 = 2.5 and (2+3+6+7)/4 = 4.5.
    x = torch.arange(8.0)[:, None]
    plan = pooling_plan(torch.tensor([[2, 4]]), torch.tensor([[0, 0, 1, 2]]), (2, 3))
    assert apply_pooling(x, plan)[:, 0].tolist() == [2.5, 4.5]
    assert plan.teacher_index.tolist() == [0, 1]  # (0,0) and (0,1) of the 2x3 teacher grid
    # The same valid box centred one row down and one column right: patches (1,1) and (1,2) = 4 and 5.
    plan = pooling_plan(torch.tensor([[2, 4]]), torch.tensor([[1, 1, 1, 2]]), (2, 3))
    assert plan.teacher_index.tolist() == [4, 5]


@pytest.mark.parametrize(
    "grids", [[(4, 6), (3, 5)], [(48, 30), (24, 15)], [(5, 3), (6, 4)], [(7, 7), (3, 2)]]
)
def test_pooling_equals_adaptive_avg_pool(grids):
    # Independent reference: torch's adaptive_avg_pool2d per image; fp32 sums of <= 9 terms: 1e-6.
    (h, w), (vh, vw) = grids
    torch.manual_seed(0)
    a, b = torch.randn(h * w, 5), torch.randn(2 * 3, 5)
    boxes = torch.tensor([[0, 0, vh, vw], [1, 1, 1, 1]])
    plan = pooling_plan(torch.tensor([[h, w], [2, 3]]), boxes, (vh + 1, vw + 1))
    out = apply_pooling(torch.cat([a, b]), plan)
    ref_a = F.adaptive_avg_pool2d(a.T.reshape(1, 5, h, w), (vh, vw)).reshape(5, -1).T
    ref_b = b.mean(0, keepdim=True)
    torch.testing.assert_close(out, torch.cat([ref_a, ref_b]), atol=1e-6, rtol=1e-6)


def test_valid_boxes():
    valid = torch.zeros(3, 3, 4, dtype=torch.bool)
    valid[0, :2, :3] = True
    valid[2, 1:3, 1:2] = True  # centred: starts at row 1, column 1
    assert valid_boxes(valid).tolist() == [[0, 0, 2, 3], [0, 0, 0, 0], [1, 1, 2, 1]]


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
    plan = pooling_plan(grids, valid_boxes(valid), (3, 3))
    with torch.no_grad():
        pred = al.heads[0]([apply_pooling(h, plan) for h in hidden])
    feats = torch.randn(2, 3, 3, 8)  # invalid patches hold noise: they must be ignored
    feats.view(-1, 8)[plan.teacher_index] = pred
    total, per = al(hidden, grids, [(feats, valid)])
    assert abs(total.item()) < 1e-6 and abs(per[0].item()) < 1e-6
    feats.view(-1, 8)[plan.teacher_index] = -pred  # opposite direction: loss 2
    assert abs(al(hidden, grids, [(feats, valid)])[0].item() - 2.0) < 1e-5


@pytest.mark.parametrize(
    "attn_scale, scale", [("official", 1 / math.sqrt(16)), ("head_dim", 1 / math.sqrt(2))]
)
def test_cross_layer_attention_matches_manual(attn_scale, scale):
    # Reference: the head computed by hand with explicit softmax over the other layers per token;
    # Ct = 16, 8 heads of 2: the official scale is Ct^-0.5 = 1/4, SDPA's head_dim^-0.5 = 1/sqrt(2).
    torch.manual_seed(0)
    cfg = AlignerConfig(hidden_size=16, teacher_widths=[16], layers=[2, 1, 0], attn_scale=attn_scale)
    head = PatchAligner(cfg).heads[0]
    hidden = [torch.randn(5, 16) for _ in range(3)]
    z = [proj(norm(h)) for h, norm, proj in zip(hidden, head.norms, head.projs)]
    q = z[0].view(5, 8, 2)
    k = torch.stack(z[1:], 1).view(5, 2, 8, 2)  # (M, layers, heads, hd)
    att = torch.einsum("mhd,mlhd->mhl", q, k) * scale
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


# ----------------------------------------------------------------------------------------------
# Parity with EVE's VisionCompressor, re-implemented here from its formula, one image at a time.


def official_valid_mask(width: int, height: int, size: int, patch: int) -> torch.Tensor:
    """EVE's teacher-view mask (compute_basehw + resize2require), average-pooled to patches: (n, n) bool.

    Long side -> size; short side = ceil(size * short / long / patch) whole patches; the image pasted
    at (n_max - n_valid) // 2 patches; mask 1 on the image, 0 on the fill.
    """
    n_max = size // patch
    mask = torch.zeros(size, size)
    if width == height:
        mask[:] = 1
    elif width > height:
        n_valid = math.ceil(size * height / width / patch)
        pre = (n_max - n_valid) // 2 * patch
        mask[pre : pre + n_valid * patch, :] = 1
    else:
        n_valid = math.ceil(size * width / height / patch)
        pre = (n_max - n_valid) // 2 * patch
        mask[:, pre : pre + n_valid * patch] = 1
    pooled = F.avg_pool2d(mask[None, None], patch, patch)[0, 0]
    assert not (pooled % 1).any()  # patch-aligned, as the official code asserts
    return pooled.bool()


def official_loss(all_layers, feats, masks, params, layers, ratio, num_heads):
    """EVE's VisionCompressor.forward for images whose student grid is `ratio` x their valid teacher grid.

    all_layers: per image (num_layers + 1, H, W, D) hidden states (HF indices); feats: per image (n, n, Ct) teacher features; masks: per image (n, n).
    Returns (loss, predictions concatenated over images), in float64.
    """
    ct = params["output.weight"].shape[0]
    loss, preds = 0.0, []
    for x, f, m in zip(all_layers, feats, masks):
        x = x.double().permute(0, 3, 1, 2)  # (L+1, D, H, W)
        if ratio > 1:
            x = F.avg_pool2d(x, ratio, ratio)
        x = x.flatten(2).permute(2, 0, 1)  # (M, L+1, D): one row per pooled token, raster order
        z = torch.stack(
            [
                F.linear(
                    F.layer_norm(x[:, idx], (x.shape[-1],), params[f"ln{j}.weight"], params[f"ln{j}.bias"]),
                    params[f"proj{j}.weight"],
                )
                for j, idx in enumerate(layers)
            ],
            1,
        )  # (M, n_layers, Ct)
        n_tok = z.shape[0]
        q = z[:, :1].reshape(n_tok, 1, num_heads, -1).transpose(1, 2)  # (M, heads, 1, hd)
        kv = z[:, 1:].reshape(n_tok, len(layers) - 1, num_heads, -1).transpose(1, 2)  # (M, heads, n-1, hd)
        attn = (q * ct**-0.5 * kv).sum(-1).softmax(-1)  # EVE: scale = clip_size ** -0.5
        fused = (attn.unsqueeze(-1) * kv).sum(-2).reshape(n_tok, -1)
        pred = F.linear(x[:, layers[0]], params["input.weight"], params["input.bias"])
        pred = pred + F.linear(fused, params["output.weight"], params["output.bias"])
        target = f.double()[m]  # valid teacher patches, raster order
        loss = loss + 1 - F.cosine_similarity(pred, target, dim=-1).mean()
        preds.append(pred)
    return loss / len(all_layers), torch.cat(preds)


@pytest.mark.parametrize("ratio", [1, 2])
def test_loss_and_prediction_equal_eves_formula(ratio):
    """Our batched PAL == EVE's per-image VisionCompressor (scale Ct^-0.5, pooling, cosine) to 1e-6 in fp32.

    Where each number comes from: the teacher boxes from `TeacherView.box` and the valid patches from
    `Teacher.valid_mask` (the code under test) against `official_valid_mask` (EVE's canvas mask
    re-derived above); the student grid is `ratio` x the valid teacher grid (EVE-7B: 1, HD: 2); hidden
    states, teacher features and weights are random, the weights shared by name with the reference.
    The tolerance: the reference runs in float64, ours in float32 (sums of <= 64 terms of size ~1).
    """
    torch.manual_seed(0)
    d, ct, heads, n_layers, size, patch = 24, 16, 8, 8, 56, 14
    layers = layers_for(n_layers, 4)  # [8, 4, 0]
    images = [(100, 30), (20, 100), (45, 100), (30, 30)]  # (width, height): landscape, portraits, square
    view = TeacherView(size, patch, (0.5,) * 3, (0.5,) * 3)
    boxes = torch.tensor([view.box(h, w) for w, h in images])
    probe = Teacher(TeacherConfig(image_size=size), width=ct, stride=patch, mean=(0.5,) * 3, std=(0.5,) * 3)
    valid = probe.valid_mask(boxes, (4, 4))
    masks = [official_valid_mask(w, h, size, patch) for w, h in images]
    assert torch.equal(valid, torch.stack(masks))
    grids = [(ratio * int(m.any(1).sum()), ratio * int(m.any(0).sum())) for m in masks]
    all_layers = [torch.randn(n_layers + 1, h, w, d) for h, w in grids]
    feats = torch.randn(len(images), 4, 4, ct)

    aligner = PatchAligner(AlignerConfig(hidden_size=d, teacher_widths=[ct], layers=layers, num_heads=heads))
    head = aligner.heads[0]
    for lin in [*head.projs, head.skip, head.out]:  # non-trivial weights and biases everywhere
        torch.nn.init.normal_(lin.weight, std=0.3)
    for p in [head.skip.bias, head.out.bias, *[n.weight for n in head.norms], *[n.bias for n in head.norms]]:
        torch.nn.init.normal_(p, mean=0.5, std=0.3)
    params = {"input.weight": head.skip.weight, "input.bias": head.skip.bias}
    params.update({"output.weight": head.out.weight, "output.bias": head.out.bias})
    for j, (norm, proj) in enumerate(zip(head.norms, head.projs)):
        params.update(
            {f"ln{j}.weight": norm.weight, f"ln{j}.bias": norm.bias, f"proj{j}.weight": proj.weight}
        )
    params = {k: v.detach().double() for k, v in params.items()}
    ref_loss, ref_pred = official_loss(all_layers, feats, masks, params, layers, ratio, heads)

    grid_hw = torch.tensor(grids)
    hidden = [torch.cat([x[idx].reshape(-1, d) for x in all_layers]) for idx in layers]  # (N, D) each
    with torch.no_grad():
        total, (loss,) = aligner(hidden, grid_hw, [(feats, valid)])
        plan = pooling_plan(grid_hw, valid_boxes(valid), (4, 4))
        pred = head([apply_pooling(h, plan) for h in hidden])
    assert pred.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(pred.double(), ref_pred, atol=1e-6, rtol=1e-6)
    assert abs(loss.item() - ref_loss.item()) < 1e-6 and total.item() == loss.item()
    # The scale matters: SDPA's default head_dim^-0.5 gives another loss (the test can fail).
    aligner.config.attn_scale = "head_dim"
    sharper = PatchAligner(aligner.config)
    sharper.load_state_dict(aligner.state_dict())
    with torch.no_grad():
        assert abs(sharper(hidden, grid_hw, [(feats, valid)])[0].item() - ref_loss.item()) > 1e-4
