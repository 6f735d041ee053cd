"""Multi-level aligning: several layers per teacher, each with its own head and loss weight, one forward."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.train.synthetic import tiny_run_config, write_shards, write_yaml
from train.aligning import ALIGNER_CONFIG, AlignerConfig, PatchAligner
from train.build import build_aligner
from train.cli import run_stage
from train.config import ConfigError, config_to_dict, load_config
from train.metrics import read_metrics
from train.teacher import TeacherConfig, TeacherLevel, TeacherSet, build_teacher, build_teachers, teacher_keys
from train.teacher_backends import TimmTeacher

REPO = Path(__file__).resolve().parents[2]
LITE0 = dict(backend="timm", name="efficientnet_lite0")
TWO_LEVELS = [{"layer": -3, "loss_weight": 0.5}, {"layer": -2, "loss_weight": 1.0}]


def _counting(module: torch.nn.Module) -> list:
    """Append to the returned list on every forward call of module."""
    calls: list = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


# ----------------------------------------------------------------------------------------------
# The aligner: a two-level loss is two single-level losses, weighted


def test_two_level_loss_is_the_weighted_sum_of_two_single_level_aligners():
    # Two levels of one teacher on a 3x3 grid (one valid mask, as a teacher returns them), widths 8
    # and 16, weights 0.3 and 2.0; the reference: two single-level aligners holding copies of the
    # same heads, each pooling for itself. Images: 6x4 student on a 3x2 box (2x pooling), 2x2 on
    # one patch, and a dummy (no valid patch).
    torch.manual_seed(0)
    grids = torch.tensor([[6, 4], [2, 2], [1, 1]])
    valid = torch.zeros(3, 3, 3, dtype=torch.bool)
    valid[0, :, :2] = True
    valid[1, 1, 1] = True
    hidden = [torch.randn(24 + 4 + 1, 16, requires_grad=True) for _ in range(3)]
    feats = [torch.randn(3, 3, 3, 8), torch.randn(3, 3, 3, 16)]
    cfg = AlignerConfig(hidden_size=16, teacher_widths=[8, 16], layers=[2, 1, 0], loss_weights=[0.3, 2.0])
    two = PatchAligner(cfg)
    singles = []
    for i, ct in enumerate([8, 16]):
        one = PatchAligner(AlignerConfig(hidden_size=16, teacher_widths=[ct], layers=[2, 1, 0]))
        one.heads[0].load_state_dict(two.heads[i].state_dict())
        singles.append(one)

    total, per = two(hidden, grids, [(feats[0], valid), (feats[1], valid)])
    grads = torch.autograd.grad(total, hidden)
    ref, ref_grads = [], []
    for one, f in zip(singles, feats):
        loss = one(hidden, grids, [(f, valid.clone())])[0]
        ref.append(loss)
        ref_grads.append(torch.autograd.grad(loss, hidden))
    # Same ops on the same numbers: each level's loss is bitwise the single aligner's.
    assert per[0].item() == ref[0].item() and per[1].item() == ref[1].item()
    assert 0.5 < ref[0].item() < 1.5 and 0.5 < ref[1].item() < 1.5  # random heads: 1 - cos ~ 1
    # fp32 sum of two terms ~1 against a float64 one: 1e-6.
    assert total.item() == pytest.approx(0.3 * ref[0].item() + 2.0 * ref[1].item(), abs=1e-6)
    for g, g0, g1 in zip(grads, *ref_grads):  # the shared pooling passes both levels' gradients back
        torch.testing.assert_close(g, 0.3 * g0 + 2.0 * g1, atol=1e-7, rtol=1e-5)  # fp32 reassociation


# ----------------------------------------------------------------------------------------------
# Teachers: one forward for all levels; finer maps pooled onto the coarse grid


@pytest.fixture(scope="module")
def lite0_two_levels():
    levels = [TeacherLevel(**lv) for lv in TWO_LEVELS]
    return build_teacher(TeacherConfig(**LITE0, image_size=64, levels=levels))


def test_levels_come_from_one_forward_and_match_single_level_teachers(lite0_two_levels):
    # References: single-level teachers of each layer; the stride-8 map (8x8 at 64 px) is averaged
    # 2x2 by hand onto the stride-16 grid (4x4) that both levels are compared on.
    t = lite0_two_levels
    assert (t.widths, t.strides, t.stride) == ([40, 112], [8, 16], 16)
    shallow = build_teacher(TeacherConfig(**LITE0, image_size=64, layer=-3))
    deep = build_teacher(TeacherConfig(**LITE0, image_size=64, layer=-2))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[0, 0, 64, 64], [16, 0, 32, 64]])  # a square image and a landscape one
    calls = _counting(t.model)
    (f_shallow, v_shallow), (f_deep, v_deep) = t(x, boxes)
    assert len(calls) == 1  # one teacher forward serves both levels
    ((ref_deep, ref_valid),) = deep(x, boxes)
    ((fine, _),) = shallow(x, boxes)
    assert fine.shape == (2, 8, 8, 40)
    ref_shallow = F.avg_pool2d(fine.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(f_deep, ref_deep, atol=0, rtol=0)  # the same modules and weights: bitwise
    torch.testing.assert_close(f_shallow, ref_shallow, atol=1e-6, rtol=1e-6)  # means of 4: fp32 order
    assert v_shallow is v_deep and torch.equal(v_deep, ref_valid)
    assert v_deep[1].sum().item() == 2 * 4  # rows 1-2 of the 4x4 grid


def test_teacher_set_flattens_levels_and_runs_each_teacher_once(lite0_two_levels):
    single = build_teacher(TeacherConfig(**LITE0, image_size=64, loss_weight=0.25))
    ts = TeacherSet([lite0_two_levels, single])
    assert ts.names == [
        "timm:efficientnet_lite0@-3",
        "timm:efficientnet_lite0@-2",
        "timm:efficientnet_lite0",
    ]
    assert ts.widths == [40, 112, 112] and ts.loss_weights == [0.5, 1.0, 0.25]
    assert len(ts.views) == 1 and ts.view_of == [0, 0, 0]  # same size, coarse stride and statistics
    calls = [_counting(lite0_two_levels.model), _counting(single.model)]
    pix, box = teacher_keys(0)
    outs = ts({pix: torch.randn(3, 3, 64, 64), box: torch.tensor([[0, 0, 64, 64]] * 3)})
    assert [o[0].shape[-1] for o in outs] == [40, 112, 112]
    assert [len(c) for c in calls] == [1, 1]
    # No image in the micro-batch: every level still gets an (empty) output on the shared grid.
    empty = lite0_two_levels(torch.zeros(0, 3, 64, 64), torch.zeros(0, 4, dtype=torch.long))
    assert [tuple(f.shape) for f, _ in empty] == [(0, 4, 4, 40), (0, 4, 4, 112)]


def test_levels_that_cannot_be_aligned_are_refused():
    # Stride 32 (-1) with 16 (-2) at 48 px: a multiple of 16 but not of 32, the view refuses.
    with pytest.raises(ValueError, match="multiple of the teacher's patch"):
        build_teachers([TeacherConfig(**LITE0, image_size=48, levels=[TeacherLevel(-2), TeacherLevel(-1)])])
    # -2 and 3 are the same map of efficientnet_lite0's five: two heads on one target.
    with pytest.raises(ValueError, match="distinct feature maps"):
        build_teacher(TeacherConfig(**LITE0, image_size=64, levels=[TeacherLevel(-2), TeacherLevel(3)]))


# ----------------------------------------------------------------------------------------------
# The config form


def test_levels_config_form_and_its_errors(tmp_path):
    tree = {"teachers": [{**LITE0, "image_size": 128, "levels": TWO_LEVELS}]}
    (teacher,) = load_config(write_yaml(tmp_path / "ok.yaml", tree)).teachers
    assert teacher.resolved_levels() == [TeacherLevel(-3, 0.5), TeacherLevel(-2, 1.0)]
    # The single-level form means what it always meant: one level `layer` at `loss_weight`.
    assert TeacherConfig(layer=-3, loss_weight=0.5).resolved_levels() == [TeacherLevel(-3, 0.5)]
    override = [("teachers.0.levels.0.loss_weight", 0.25)]
    config = load_config(write_yaml(tmp_path / "ok.yaml", tree), override)
    assert config.teachers[0].levels[0].loss_weight == 0.25
    bad = [
        ({"levels": [{"layer": -2}, {"layer": -2}]}, "distinct layers"),
        ({"levels": []}, "distinct layers"),
        ({"layer": -3, "levels": TWO_LEVELS}, "inside `levels`"),
        ({"loss_weight": 2.0, "levels": TWO_LEVELS}, "inside `levels`"),
    ]
    for fields, message in bad:
        path = write_yaml(tmp_path / "bad.yaml", {"teachers": [{**LITE0, **fields}]})
        with pytest.raises(ValueError, match=message):
            load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'teachers\.0\.levels\.0\.weight'"):
        load_config(write_yaml(tmp_path / "bad.yaml", {"teachers": [{**LITE0, "levels": [{"weight": 1}]}]}))


def test_shipped_multilevel_configs_differ_from_their_base_only_in_teachers_and_paths():
    # No config inheritance: the copies are kept in step with their base files by this test.
    pairs = [
        ("tiny/stage1.yaml", "tiny/stage1_multilevel.yaml"),
        ("tiny/stage2.yaml", "tiny/stage2_multilevel.yaml"),
        ("eve7b/stage1.yaml", "eve7b/stage1_multiteacher.yaml"),
    ]
    for base, multi in pairs:
        a, b = (config_to_dict(load_config(REPO / "configs" / p)) for p in (base, multi))
        for section, key in (("train", "output_dir"), ("model", "init_path")):
            a[section].pop(key), b[section].pop(key)
        teachers = b.pop("teachers")
        a.pop("teachers")
        assert a == b, multi
        assert all(len(t["levels"]) == 2 for t in teachers), multi
    tiny = load_config(REPO / "configs/tiny/stage1_multilevel.yaml").teachers[0]
    assert [lv.layer for lv in tiny.levels] == [-3, -2] and tiny.image_size == 128
    big = load_config(REPO / "configs/eve7b/stage1_multiteacher.yaml").teachers
    assert [(t.backend, [lv.layer for lv in t.levels]) for t in big] == [
        ("hf_clip", [8, -2]),
        ("hf_dinov2", [8, -2]),
    ]


# ----------------------------------------------------------------------------------------------
# Checkpoints: single-level keys unchanged, multi-level save/load/continue


def test_single_level_names_and_checkpoint_keys_are_unchanged(tmp_path):
    ts = build_teachers([TeacherConfig(**LITE0, image_size=64)])
    assert ts.names == ["timm:efficientnet_lite0"] and ts.widths == [112] and ts.loss_weights == [1.0]
    aligner = PatchAligner(AlignerConfig(hidden_size=16, teacher_widths=ts.widths, layers=[2, 1, 0]))
    aligner.save(tmp_path)
    from safetensors.torch import load_file

    keys = [f"heads.0.norms.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    keys += [f"heads.0.projs.{i}.weight" for i in range(3)]
    keys += ["heads.0.skip.weight", "heads.0.skip.bias", "heads.0.out.weight", "heads.0.out.bias"]
    assert sorted(load_file(str(tmp_path / "aligner.safetensors"))) == sorted(keys)


def _run_config(init_path: Path) -> SimpleNamespace:
    """What build_aligner reads of a run config: the init export and the PAL shape (layers 2, 1, 0)."""
    from train.config import AligningConfig, ModelConfig, RunConfig

    return RunConfig(model=ModelConfig(init_path=str(init_path)), aligning=AligningConfig(layer_step=1))


MODEL = SimpleNamespace(config=SimpleNamespace(hidden_size=16, num_hidden_layers=2))


def _same_weights(a: PatchAligner, b: PatchAligner) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_written_before_heads_had_names_is_continued(tmp_path):
    teachers = build_teachers([TeacherConfig(**LITE0, image_size=64)])
    torch.manual_seed(0)
    old = PatchAligner(AlignerConfig(hidden_size=16, teacher_widths=[112], layers=[2, 1, 0]))
    old.save(tmp_path)
    cfg = json.loads((tmp_path / ALIGNER_CONFIG).read_text())
    del cfg["names"]  # aligner_config.json as the previous version wrote it
    (tmp_path / ALIGNER_CONFIG).write_text(json.dumps(cfg))
    continued = build_aligner(_run_config(tmp_path), MODEL, teachers)
    assert _same_weights(continued, old) and continued.config.names == ["timm:efficientnet_lite0"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random 3-block CLIPVisionModel (width 32, 8-px patches, 32 px) saved as a local directory."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    CLIPVisionModel(cfg).save_pretrained(str(path))
    return str(path)


def test_multi_level_save_load_gives_identical_losses_and_continues_only_the_same_levels(
    tmp_path, tiny_clip_dir
):
    # Two CLIP levels of equal width: only the names tell their heads apart.
    def teachers(layers: list[int], weight: float = 0.5) -> TeacherSet:
        levels = [TeacherLevel(layer, weight) for layer in layers]
        config = TeacherConfig(
            backend="hf_clip", name="tiny", weights=tiny_clip_dir, image_size=32, levels=levels
        )
        return build_teachers([config])

    ts = teachers([1, -2])
    torch.manual_seed(0)
    aligner = build_aligner(_run_config(tmp_path / "none"), MODEL, ts)
    pix, box = teacher_keys(0)
    batch = {pix: torch.randn(2, 3, 32, 32), box: torch.tensor([[0, 0, 32, 32], [8, 0, 16, 32]])}
    outs = ts(batch)
    grids = torch.tensor([[4, 4], [2, 4]])
    hidden = [torch.randn(24, 16) for _ in range(3)]
    with torch.no_grad():
        total, per = aligner(hidden, grids, outs)
    aligner.save(tmp_path / "export")
    loaded = PatchAligner.load(tmp_path / "export")
    assert loaded.config.names == ["hf_clip:tiny@1", "hf_clip:tiny@-2"] and len(loaded.heads) == 2
    with torch.no_grad():
        total2, per2 = loaded(hidden, grids, outs)
    assert total2.item() == total.item() and [p.item() for p in per2] == [p.item() for p in per]  # bitwise
    # The next stage continues them onto the same levels (new loss weights allowed) ...
    continued = build_aligner(_run_config(tmp_path / "export"), MODEL, teachers([1, -2], weight=1.0))
    assert _same_weights(continued, aligner) and continued.config.loss_weights == [1.0, 1.0]
    # ... and starts fresh when the levels come in another order (same widths, other names).
    fresh = build_aligner(_run_config(tmp_path / "export"), MODEL, teachers([-2, 1]))
    assert not _same_weights(fresh, aligner)


# ----------------------------------------------------------------------------------------------
# Other backends: all levels from one forward pass


@pytest.mark.parametrize("backend", ["hf_clip", "hf_dinov2"])
def test_hf_levels_equal_the_hidden_states(tmp_path, tiny_clip_dir, backend):
    # DINOv2 built for 56 px runs at 32 px (position embeddings interpolated). Reference: the model's
    # own hidden_states, CLS dropped, one by one.
    path = tiny_clip_dir
    if backend == "hf_dinov2":
        from transformers import Dinov2Config, Dinov2Model

        path = str(tmp_path / "dinov2")
        cfg = Dinov2Config(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=8
        )
        Dinov2Model(cfg).save_pretrained(path)
    t = build_teacher(
        TeacherConfig(
            backend=backend,
            name="tiny",
            weights=path,
            image_size=32,
            levels=[TeacherLevel(-1), TeacherLevel(1)],
        )
    )
    calls = _counting(t.model.embeddings)
    x = torch.randn(2, 3, 32, 32)
    outs = t(x, torch.tensor([[0, 0, 32, 32]] * 2))
    assert len(calls) == 1
    with torch.no_grad():
        hs = t.model(pixel_values=x, output_hidden_states=True).hidden_states
    for (feats, _), layer in zip(outs, [-1, 1]):
        torch.testing.assert_close(feats, hs[layer][:, 1:].reshape(2, 4, 4, 32), atol=0, rtol=0)


@pytest.mark.parametrize("name, size", [("ViT-S-32", 224), ("PE-Core-T-16-384", 384)])
def test_open_clip_levels_in_any_order(name, size):
    # open_clip's own ViT (ViT-S-32) and a timm trunk (PE-Core-T): forward_intermediates returns blocks
    # in ascending order, whatever order the levels name them in. Reference: one block per call.
    t = build_teacher(
        TeacherConfig(
            backend="open_clip", name=name, image_size=size, levels=[TeacherLevel(-2), TeacherLevel(1)]
        )
    )
    visual = t.visual
    stem = visual.trunk.patch_embed if hasattr(visual, "trunk") else visual.conv1
    calls = _counting(stem)
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    outs = t(x, torch.tensor([[0, 0, size, size]]))
    assert len(calls) == 1
    g = size // t.stride
    for (feats, _), layer in zip(outs, [-2, 1]):
        with torch.no_grad():
            if hasattr(visual, "trunk"):
                (ref,) = visual.trunk.forward_intermediates(
                    x, indices=[layer], output_fmt="NLC", intermediates_only=True
                )
            else:
                (ref,) = visual.forward_intermediates(
                    x, indices=[layer], output_fmt="NLC", intermediates_only=True
                )["image_intermediates"]
        torch.testing.assert_close(feats, ref[:, -g * g :].reshape(1, g, g, -1), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Training: the shipped tiny configs, and exact resume


def test_tiny_multilevel_stages_log_both_levels(tmp_path, monkeypatch, caplog):
    """2 steps of configs/tiny/stage1_multilevel.yaml, then 1 of stage2_multilevel.yaml from its export."""
    forwards = []
    extract = TimmTeacher.extract
    monkeypatch.setattr(TimmTeacher, "extract", lambda self, x: forwards.append(1) or extract(self, x))
    shards = write_shards(tmp_path / "shards", n_samples=8, per_shard=8)
    common = ["--data.shards", json.dumps(shards), "--train.global_batch_size", "4"]
    common += ["--train.micro_batch_size", "4", "--train.save_every", "0"]
    s1 = run_stage(
        "stage1",
        ["--config", str(REPO / "configs/tiny/stage1_multilevel.yaml"), *common]
        + ["--train.max_steps", "2", "--train.output_dir", str(tmp_path / "s1")],
    )
    assert len(forwards) == 2  # one teacher forward per step (one micro-batch), both levels from it
    with caplog.at_level(logging.INFO, logger="train.build"):
        run_stage(
            "stage2",
            ["--config", str(REPO / "configs/tiny/stage2_multilevel.yaml"), *common]
            + [
                "--train.max_steps",
                "1",
                "--train.output_dir",
                str(tmp_path / "s2"),
                "--model.init_path",
                str(s1),
            ],
        )
    assert "aligning layer continued" in caplog.text
    levels = ["align_loss/timm:efficientnet_lite0@-3", "align_loss/timm:efficientnet_lite0@-2"]
    for run, steps in (("s1", 2), ("s2", 1)):
        records = read_metrics(tmp_path / run)
        assert len(records) == steps
        for r in records:
            assert all(0.0 < r[k] < 2.0 for k in levels)  # 1 - cosine lies in [0, 2]
            assert r["align_loss"] == r[levels[0]] + r[levels[1]]  # weights 1, 1: the same float sum
    assert PatchAligner.load(tmp_path / "s2" / "export").config.teacher_widths == [40, 112]


def test_multilevel_resume_equals_an_uninterrupted_run(tmp_path):
    shards = write_shards(tmp_path / "shards", n_samples=16, per_shard=8)
    teachers = [{**LITE0, "image_size": 64, "levels": TWO_LEVELS}]

    def config(name: str) -> str:
        tree = tiny_run_config(
            tmp_path,
            "stage1",
            data={"shards": shards},
            teachers=teachers,
            train={"max_steps": 4, "save_every": 2, "output_dir": str(tmp_path / name)},
        )
        return write_yaml(tmp_path / f"{name}.yaml", tree)

    def logged(name: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(tmp_path / name)]

    run_stage("stage1", ["--config", config("ref")])
    run_stage("stage1", ["--config", config("run"), "--train.stop_after", "3"])
    run_stage("stage1", ["--config", config("run"), "--resume"])
    # Same ops on the same inputs in the same order (one process): bitwise equal, per level too.
    assert logged("run") == logged("ref") and "align_loss/timm:efficientnet_lite0@-3" in logged("ref")[0]
