"""Frozen teachers: real efficientnet-lite0 weights, valid masks, no gradient, the teacher set."""

import pytest
import timm
import torch
from PIL import Image

from eve.image_processing_eve import CLIP_MEAN, CLIP_STD
from train.aligning import AlignerConfig, PatchAligner
from train.teacher import (
    TeacherConfig,
    TeacherSet,
    TeacherView,
    build_teacher,
    teacher_keys,
)
from train.teacher_backends import load_timm_weights


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
    ((feats, valid),) = lite0(x, torch.tensor([[0, 0, 64, 64], [0, 0, 64, 64]]))  # one level
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


def test_valid_mask_of_boxes(lite0):
    # 64-px canvas, stride 16 -> 4x4 grid. A 64 x 32 (h x w) box at left 16 covers cols 1..2; a box
    # of 20 x 64 px at top 16 covers rows 1..2 (16..36 px overlaps patches 1 and 2); a dummy box
    # (all 0) covers nothing.
    x = torch.zeros(3, 3, 64, 64)
    ((_, valid),) = lite0(x, torch.tensor([[0, 16, 64, 32], [16, 0, 20, 64], [0, 0, 0, 0]]))
    expect = torch.zeros(3, 4, 4, dtype=torch.bool)
    expect[0, :, 1:3] = True
    expect[1, 1:3, :] = True
    assert torch.equal(valid, expect)


# The official view (EVE's `compute_basehw` + `resize2require`), worked by hand for S = 56, patch 14
# (n_max = 4 patches), CLIP mean: fill colour int(mean * 255) = (122, 116, 104).
FILL = torch.tensor([122, 116, 104])


def _view():
    return TeacherView(56, 14, CLIP_MEAN, CLIP_STD)


def _normalised(rgb):
    return (torch.as_tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(
        CLIP_STD
    )


@pytest.mark.parametrize(
    "size_wh, box",
    [
        # landscape 100 x 30: 56 * 30 / 100 = 16.8 px -> 2 patches = 28 px high; offset (4-2)//2 = 1 patch
        ((100, 30), (14, 0, 28, 56)),
        # portrait 20 x 100: 56 * 20 / 100 = 11.2 px -> 1 patch = 14 px wide; offset (4-1)//2 = 1 patch
        ((20, 100), (0, 14, 56, 14)),
        # portrait 45 x 100: 25.2 px -> 2 patches; offset 1 patch
        ((45, 100), (0, 14, 56, 28)),
        # square 30 x 30 -> 56 x 56, no offset
        ((30, 30), (0, 0, 56, 56)),
        # landscape 100 x 5: 2.8 px -> 1 patch (at least one); offset (4-1)//2 = 1 patch
        ((100, 5), (14, 0, 14, 56)),
    ],
)
def test_teacher_view_box_and_pixels(size_wh, box):
    red = Image.new("RGB", size_wh, (255, 0, 0))
    out = _view().render([red])
    pix, boxes = out["teacher_pixel_values"], out["teacher_image_boxes"]
    assert pix.shape == (1, 3, 56, 56) and boxes.tolist() == [list(box)]
    top, left, h, w = box
    inside = torch.zeros(56, 56, dtype=torch.bool)
    inside[top : top + h, left : left + w] = True
    # A uniform red image stays exactly red after a bicubic resize; fp32 normalisation: 1e-6.
    want_red = _normalised([255, 0, 0]).view(3, 1)
    want_fill = _normalised(FILL).view(3, 1)
    torch.testing.assert_close(pix[0][:, inside], want_red.expand(3, int(inside.sum())), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        pix[0][:, ~inside], want_fill.expand(3, int((~inside).sum())), atol=1e-6, rtol=0
    )


def test_teacher_view_valid_patches_line_up_with_the_student_grid():
    # The student image of EVE-7B (672 px, 28-px tokens) and the teacher view (336 px, 14-px patches)
    # of the same picture: the valid teacher grid equals the student token grid for any aspect ratio.
    from eve import EveConfig, EveImageProcessor

    student = EveImageProcessor.from_config(EveConfig.from_preset("eve-7b"))
    view = TeacherView(336, 14, CLIP_MEAN, CLIP_STD)
    for h, w in [(480, 640), (640, 480), (500, 500), (37, 1000), (1000, 37), (333, 334)]:
        _, _, vh, vw = view.box(h, w)
        assert (vh // 14, vw // 14) == student.grid_hw(h, w), (h, w)


def test_teacher_view_of_a_real_photo_and_mode(lite0):
    # A greyscale photo (scikit-image's camera, mode L) is converted to RGB; the teacher's mean fills.
    from skimage import data

    camera = Image.fromarray(data.camera()[:, :300])  # 512 x 300 (h x w): portrait
    view = TeacherSet([lite0]).views[0]
    out = view.render(camera)
    top, left, h, w = out["teacher_image_boxes"][0].tolist()
    # 64 * 300 / 512 = 37.5 px -> 3 patches of 16 = 48 px; offset (4 - 3) // 2 = 0 patches.
    assert (top, left, h, w) == (0, 0, 64, 48) and view.patch == 16
    ((_, valid),) = lite0(out["teacher_pixel_values"], out["teacher_image_boxes"])
    assert valid[0].sum().item() == 4 * 3 and valid[0, :, 3].any().item() is False


def test_teacher_view_size_must_be_whole_patches():
    with pytest.raises(ValueError, match="multiple of the teacher's patch"):
        TeacherView(100, 14, CLIP_MEAN, CLIP_STD)


def test_no_gradient_reaches_teacher(lite0):
    teachers = TeacherSet([lite0])
    teachers.train()  # a run calls model.train(): the teacher must stay in eval
    assert not lite0.training and all(not p.requires_grad for p in lite0.parameters())
    pix, boxes = teacher_keys(0)
    batch = {pix: torch.randn(1, 3, 64, 64, requires_grad=True), boxes: torch.tensor([[0, 0, 64, 64]])}
    ((feats, valid),) = teachers(batch)
    assert not feats.requires_grad
    aligner = PatchAligner(AlignerConfig(hidden_size=8, teacher_widths=teachers.widths, layers=[1, 0]))
    hidden = [torch.randn(16, 8, requires_grad=True) for _ in range(2)]
    total, _ = aligner(hidden, torch.tensor([[4, 4]]), [(feats, valid)])
    total.backward()
    assert all(p.grad is None for p in lite0.parameters()) and batch[pix].grad is None
    assert hidden[0].grad is not None


def test_teacher_set_dedupes_views(lite0):
    # Same size, stride and statistics: one view; another stride (map -1: 32 px) or size: its own.
    same = build_teacher(
        TeacherConfig(backend="timm", name="efficientnet_lite0", image_size=64, loss_weight=0.5)
    )
    coarse = build_teacher(TeacherConfig(backend="timm", name="efficientnet_lite0", image_size=64, layer=-1))
    bigger = build_teacher(TeacherConfig(backend="timm", name="efficientnet_lite0", image_size=96))
    ts = TeacherSet([lite0, same, coarse, bigger])
    assert ts.view_of == [0, 0, 1, 2] and ts.widths == [112, 112, 320, 112]
    assert [(v.size, v.patch) for v in ts.views] == [(64, 16), (64, 32), (96, 16)]
