"""Run config: every YAML in configs/ loads and holds the paper's numbers; unknown keys are errors."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from eve.config_loader import field_docs
from train.config import (
    ConfigError,
    RunConfig,
    config_from_argv,
    config_to_dict,
    help_text,
    load_config,
)
from train.stages import STAGES

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
TRAIN_YAMLS = sorted(p for d in ("tiny", "eve7b", "eve7b_hd") for p in (CONFIGS / d).glob("*.yaml"))

# The paper's stage table (docs/stages.md): lr, global batch, warm-up ratio, max length, template.
PAPER = {
    "stage1": dict(lr=4e-4, batch=512, warmup=0.03, max_length=2048, template="plain"),
    "stage2": dict(lr=4e-5, batch=512, warmup=0.01, max_length=2048, template="plain"),
    "sft": dict(lr=2e-5, batch=128, warmup=0.01, max_length=2048, template="vicuna_v1"),
}


def test_every_training_yaml_is_covered():
    names = {str(p.relative_to(CONFIGS)) for p in TRAIN_YAMLS}
    assert names == {
        "tiny/stage1.yaml",
        "tiny/stage2.yaml",
        "tiny/sft.yaml",
        "tiny/sft_lora.yaml",  # LoRA (tests/train/test_lora.py)
        "tiny/stage1_multilevel.yaml",  # multi-level aligning (tests/train/test_multilevel.py)
        "tiny/stage2_multilevel.yaml",
        "eve7b/stage1.yaml",
        "eve7b/stage1_multiteacher.yaml",
        "eve7b/stage2.yaml",
        "eve7b/sft.yaml",
        "eve7b_hd/sft.yaml",
    }


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_loads_and_is_consistent(path):
    config = load_config(path)
    stage = STAGES[config.stage.name]
    assert path.stem.split("_")[0] == {"stage1": "stage1", "stage2": "stage2", "sft": "sft"}[stage.name]
    # The YAML's template is the stage's template; the optimizer follows the paper's recipe.
    assert config.data.template == stage.template
    assert config.optim.weight_decay == 0.0 and config.optim.schedule == "cosine"
    assert config.optim.warmup_ratio == PAPER[stage.name]["warmup"]
    assert config.teachers and all(t.loss_weight == 1.0 for t in config.teachers)
    # Stage 1 starts from an LLM, stages 2-3 from the previous stage's export in the same family.
    if stage.previous is None:
        assert config.model.init_path is None
    else:
        assert config.model.init_path.endswith(f"/{stage.previous}/export")
    if config.train.deepspeed is not None:
        assert (REPO / config.train.deepspeed).is_file()


@pytest.mark.parametrize("family", ["eve7b", "eve7b_hd"])
def test_7b_configs_have_the_paper_numbers(family):
    for path in sorted((CONFIGS / family).glob("*.yaml")):
        config = load_config(path)
        want = PAPER[config.stage.name]
        assert config.optim.lr == want["lr"], path
        assert config.train.global_batch_size == want["batch"], path
        assert config.optim.warmup_ratio == want["warmup"], path
        assert config.data.max_length == (4096 if family == "eve7b_hd" else want["max_length"]), path
        assert config.data.template == want["template"], path
        assert config.model.dtype == "bfloat16" and config.model.gradient_checkpointing, path
        assert config.train.deepspeed == "configs/deepspeed/zero3.json", path
        assert config.aligning.layer_step == 4, path  # layers 32, 28, ..., 0 of Vicuna-7B
        assert config.train.epochs == 1.0 and config.train.max_steps is None, path
        teacher = config.teachers[0]
        deepest = teacher.resolved_levels()[-1].layer
        assert (teacher.image_size, deepest) == (336, -2), path  # CLIP-L/14-336, penultimate


# EVEv2-7B's official scripts (128 GPUs): stage -> (config, lr, global batch, max length, template, px).
EVE2_OFFICIAL = {
    "0": ("stage0", 2e-4, 1024, 2048, "plain", 800),
    "1.0": ("stage1", 1e-4, 1024, 2048, "plain", 800),
    "1.1": ("stage1_hd", 5e-5, 1024, 4096, "plain", 1600),
    "2": ("stage2", 2e-5, 512, 4096, "qwen2", 1600),
    "3": ("sft", 1e-5, 512, 5000, "qwen2", 1600),
}


def test_eve2_7b_configs_have_the_official_numbers():
    from eve.configuration_eve import EveConfig

    assert {p.stem for p in (CONFIGS / "eve2_7b").glob("*.yaml")} == {v[0] for v in EVE2_OFFICIAL.values()}
    trained = {}
    previous = None
    for name, lr, batch, length, template, px in EVE2_OFFICIAL.values():
        config = load_config(CONFIGS / f"eve2_7b/{name}.yaml")
        assert (config.optim.lr, config.train.global_batch_size) == (lr, batch), name
        assert (config.data.max_length, config.data.template) == (length, template), name
        assert config.optim.warmup_ratio == 0.03 and config.optim.weight_decay == 0.0, name
        assert config.teachers == [], name  # no aligning loss in EVEv2
        assert config.train.deepspeed == "configs/deepspeed/zero3.json", name
        model = EveConfig.from_preset(config.model.preset, **config.model.overrides)
        assert (model.backbone, model.vision_frontend, model.max_image_size) == ("qwen2", "pel2", px), name
        # Each stage starts from the one before (stage 0 from the Qwen2.5 LLM).
        assert config.model.init_path == (None if previous is None else f"runs/eve2_7b/{previous}/export"), (
            name
        )
        assert config.train.output_dir == f"runs/eve2_7b/{name}", name
        previous = name
        trained[name] = set(STAGES[config.stage.name].trainable)
    assert trained["stage0"] == {"vision", "projector"}
    assert trained["stage1"] == trained["stage1_hd"] == {"vision", "projector", "visual"}
    assert {"llm", "visual", "vision"} <= trained["stage2"] == trained["sft"]


def test_tiny_eve2_configs_mirror_the_tiny_ones():
    """configs/tiny_eve2/ keep EVE's tiny data, batch, LR and epochs per stage, without teachers; each
    stage starts from the previous one's export."""
    pairs = {"stage0": "stage1", "stage1": "stage1", "stage2": "stage2", "sft": "sft"}
    previous = None
    for name, v1_name in pairs.items():
        eve2, v1 = (
            load_config(CONFIGS / f"tiny_eve2/{name}.yaml"),
            load_config(CONFIGS / f"tiny/{v1_name}.yaml"),
        )
        assert eve2.model.preset == "tiny-eve2" and eve2.teachers == [], name
        assert (eve2.optim, eve2.data, eve2.train.epochs) == (v1.optim, v1.data, v1.train.epochs), name
        assert eve2.model.init_path == (None if previous is None else f"runs/demo_eve2/{previous}/export")
        assert eve2.stage.name == {"stage0": "eve2_stage0", "stage1": "eve2_stage1"}.get(name, name)
        previous = name


def test_hd_sft_raises_the_image_size():
    config = load_config(CONFIGS / "eve7b_hd/sft.yaml")
    from eve.configuration_eve import PRESETS

    assert config.model.preset == "eve-7b-hd"
    # The stage 2 export is an eve-7b model: the overrides turn its vision fields into the HD preset's.
    hd_vision = {k: v for k, v in PRESETS["eve-7b-hd"].items() if PRESETS["eve-7b"].get(k) != v}
    assert config.model.overrides == hd_vision == {"max_image_size": 1344, "image_resize_multiple": 56}


def test_tiny_configs_read_the_embedded_demo_data():
    s1, s2, sft = (load_config(CONFIGS / f"tiny/{n}.yaml") for n in ("stage1", "stage2", "sft"))
    assert s1.data.shards == s2.data.shards == ["runs/demo/data/curated/shards/*.tar"]
    assert (sft.data.json, sft.data.image_root) == ("runs/demo/data/sft_easy_vqa.json", "runs/demo/data")
    assert [c.train.output_dir for c in (s1, s2, sft)] == [
        "runs/demo/stage1",
        "runs/demo/stage2",
        "runs/demo/sft",
    ]
    assert s1.model.llm_path is None and s1.model.preset == "tiny"  # a random tiny LLM by default
    assert (
        s2.model.init_path == "runs/demo/stage1/export" and sft.model.init_path == "runs/demo/stage2/export"
    )
    for c in (s1, s2, sft):
        # plain CPU path, bf16 autocast (~4.5x the fp32 matmul rate here), one forward per step
        assert c.train.deepspeed is None and c.model.dtype == "bfloat16"
        assert c.train.micro_batch_size == c.train.global_batch_size
        assert [(t.backend, t.name, t.weights) for t in c.teachers] == [("timm", "efficientnet_lite0", None)]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_jsons(stage):
    ds = json.loads((CONFIGS / f"deepspeed/zero{stage}.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    # The engine passes a torch AdamW and its own schedule (no fused/cpu Adam compilation).
    assert "optimizer" not in ds and "scheduler" not in ds
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert ds[key] == "auto"


def test_unknown_yaml_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  lr_warmup: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'optim\.lr_warmup'"):
        load_config(path)
    path.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'trainer'"):
        load_config(path)
    path.write_text("teachers:\n  - {backend: timm, weight: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'teachers\.0\.weight'"):
        load_config(path)


def test_unknown_command_line_key_is_an_error():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'train\.lr'"):
        config_from_argv(["--config", str(CONFIGS / "tiny/stage1.yaml"), "--train.lr", "1e-4"])


def test_command_line_overrides_are_typed():
    config = config_from_argv(
        [
            "--config",
            str(CONFIGS / "tiny/stage1.yaml"),
            "--optim.lr",
            "1e-4",  # a string to YAML 1.1: coerced by the field type
            "--data.max_length=512",
            "--data.packing",
            "false",
            "--optim.betas",
            "[0.9, 0.95]",
            "--teachers.0.loss_weight",
            "0.5",
            "--resume",
        ]
    )
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.data.max_length == 512 and config.data.packing is False
    assert config.optim.betas == (0.9, 0.95)
    assert config.teachers[0].loss_weight == 0.5
    assert config.train.resume == "auto"
    resumed = config_from_argv(["--resume", "runs/x/checkpoints/step-0000004", "--train.seed", "3"])
    assert (resumed.train.resume, resumed.train.seed) == ("runs/x/checkpoints/step-0000004", 3)


def test_bad_values_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.max_steps' must be an integer"):
        load_config(None, [("train.max_steps", "ten")])
    with pytest.raises(ConfigError, match=r"'model\.dtype' must be one of"):
        load_config(None, [("model.dtype", "float16")])
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_a_docstring():
    def walk(cls):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            inner = typing.get_args(hints[f.name]) or (hints[f.name],)
            for tp in inner:
                if dataclasses.is_dataclass(tp):
                    walk(tp)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(RunConfig)


def test_help_lists_every_setting_with_its_docstring():
    """`--help` of the entry scripts: one line per field (teachers' fields under teachers.N.)."""
    lines = {line.strip() for line in help_text().splitlines()}

    def walk(cls, prefix):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                assert f"[{prefix}{f.name}] {docs[f.name]}" in lines
                walk(tp, f"{prefix}{f.name}.")
                continue
            line = next((x for x in lines if x.startswith(f"--{prefix}{f.name} (")), "")
            assert line.endswith(docs[f.name]), f"{prefix}{f.name}"
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if dataclasses.is_dataclass(item):
                walk(item, f"{prefix}{f.name}.N.")

    walk(RunConfig, "")
    assert any(x.startswith("--teachers.N.loss_weight (float, default 1.0): ") for x in lines)


def test_round_trip_through_a_dict(tmp_path):
    import yaml

    config = load_config(CONFIGS / "eve7b/sft.yaml")
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(path) == config


def test_llava_reference_configs_follow_llava_1_5():
    # LLaVA-1.5: connector alignment LR 1e-3, batch 256; SFT LR 2e-5, batch 128; CLIP-L/14-336 layer -2.
    align = load_config(CONFIGS / "llava15_7b/align.yaml")
    sft = load_config(CONFIGS / "llava15_7b/sft.yaml")
    assert (align.stage.name, align.optim.lr, align.train.global_batch_size) == ("align", 1e-3, 256)
    assert (sft.stage.name, sft.optim.lr, sft.train.global_batch_size) == ("sft", 2e-5, 128)
    assert align.teachers == [] and sft.teachers == []
    assert align.model.overrides["vision_encoders"][0]["layers"] == [-2]
    assert sft.model.init_path == align.train.output_dir + "/export"
