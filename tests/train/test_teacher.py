"""Frozen teachers: real efficientnet-lite0 weights, valid masks, no gradient, the teacher set."""

import pytest
import timm
import torch

from train.aligning import AlignerConfig, PatchAligner
from train.teacher import TeacherConfig, TeacherSet, build_teacher, load_timm_weights, teacher_keys


@pytest.fixture(scope="module")
def lite0():
    return build_teacher(TeacherConfig(backend="timm", name="efficientnet_lite0", image_size=64))


def test_lite0_real_weights_match_timm_forward(lite0):
    # Reference: timm's full (classifier-bearing) efficientnet_lite0 with the package weights loaded
    # strictly, run stem + the first 5 stages by hand (stride 16, 112 channels == feature map -2).
    from eve.assets import efficientnet_lite0_weights_path

    full = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    load_timm_weights(full, str(efficientnet_lite0_weights_path()), "efficientnet_lite0")
    sd = torch.load(efficientnet_lite0_weights_path(), weights_only=True)
    first = next(iter(sd.values()))
    assert torch.equal(full.conv_stem.weight, first)  # the real weights, not a random init
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = full.blocks[:5](full.bn1(full.conv_stem(x))).permute(0, 2, 3, 1)
    feats, valid = lite0(x, torch.tensor([[64, 64], [64, 64]]))
    assert lite0.width == 112 and lite0.stride == 16 and feats.shape == (2, 4, 4, 112)
    torch.testing.assert_close(feats, ref, atol=0, rtol=0)  # same modules, same weights: bitwise
    assert valid.all()


def test_lite0_classifies_a_real_photo():
    # The mapped weights are ImageNet weights: skimage's coffee photo is an espresso (class 967).
    from skimage import data

    full = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    from eve.assets import efficientnet_lite0_weights_path

    load_timm_weights(full, str(efficientnet_lite0_weights_path()), "efficientnet_lite0")
    img = torch.from_numpy(data.coffee()).permute(2, 0, 1)[None].float() / 255
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    img = (img - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[
        :, None, None
    ]
    with torch.no_grad():
        assert full(img).argmax().item() == 967


def test_valid_mask_non_square(lite0):
    # 64-px canvas, stride 16 -> 4x4 grid. A 64x20 (h x w) image covers cols 0..1 (20 px -> ceil(20/16)=2),
    # a 17x64 image covers rows 0..1, a dummy (0, 0) image covers nothing.
    x = torch.zeros(3, 3, 64, 64)
    _, valid = lite0(x, torch.tensor([[64, 20], [17, 64], [0, 0]]))
    expect = torch.zeros(3, 4, 4, dtype=torch.bool)
    expect[0, :, :2] = True
    expect[1, :2, :] = True
    assert torch.equal(valid, expect)


def test_no_gradient_reaches_teacher(lite0):
    teachers = TeacherSet([lite0])
    teachers.train()  # a run calls model.train(): the teacher must stay in eval
    assert not lite0.training and all(not p.requires_grad for p in lite0.parameters())
    pix, sizes = teacher_keys(0)
    batch = {pix: torch.randn(1, 3, 64, 64, requires_grad=True), sizes: torch.tensor([[64, 64]])}
    ((feats, valid),) = teachers(batch)
    assert not feats.requires_grad
    aligner = PatchAligner(AlignerConfig(hidden_size=8, teacher_widths=teachers.widths, layers=[1, 0]))
    hidden = [torch.randn(16, 8, requires_grad=True) for _ in range(2)]
    total, _ = aligner(hidden, torch.tensor([[4, 4]]), [(feats, valid)])
    total.backward()
    assert all(p.grad is None for p in lite0.parameters()) and batch[pix].grad is None
    assert hidden[0].grad is not None


def test_teacher_set_dedupes_views(lite0):
    other = build_teacher(TeacherConfig(backend="timm", name="efficientnet_lite0", image_size=64, layer=-1))
    bigger = build_teacher(TeacherConfig(backend="timm", name="efficientnet_lite0", image_size=96))
    ts = TeacherSet([lite0, other, bigger])
    assert ts.view_of == [0, 0, 1] and ts.widths == [112, 320, 112]
    assert [v.size for v in ts.views] == [64, 96]
