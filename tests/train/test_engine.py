"""The engine on real files: three chained stages on CPU, metrics, export, loss normalisation."""

import math

import pytest
import torch

from tests.train.synthetic import (
    TINY_MODEL,
    draw,
    tiny_run_config,
    write_llava_json,
    write_shards,
    write_yaml,
)
from train.aligning import PatchAligner
from train.build import lr_lambda
from train.cli import run_stage
from train.engine import Trainer, TrainModule, count_loss_tokens
from train.metrics import read_metrics


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    """stage 1 (webdataset tars) -> stage 2 (its export) -> SFT (LLaVA JSON, text-only mixed in)."""
    tmp = tmp_path_factory.mktemp("stages")
    shards = write_shards(tmp / "shards", n_samples=16, per_shard=8)
    sft_json = write_llava_json(tmp / "sft", n_samples=12)
    runs = {}
    s1 = tiny_run_config(tmp, "stage1", data={"shards": shards}, train={"output_dir": str(tmp / "stage1")})
    runs["stage1"] = run_stage("stage1", ["--config", write_yaml(tmp / "s1.yaml", s1)])
    s2 = tiny_run_config(
        tmp,
        "stage2",
        data={"shards": shards},
        model={"init_path": str(runs["stage1"])},
        train={"output_dir": str(tmp / "stage2"), "max_steps": 2},
    )
    runs["stage2"] = run_stage("stage2", ["--config", write_yaml(tmp / "s2.yaml", s2)])
    s3 = tiny_run_config(
        tmp,
        "sft",
        data={"json": str(sft_json), "image_root": str(tmp / "sft"), "packing": False},
        # As EVE-7B-HD fine-tunes a 672-px model at 1344 px: 64 px here, an 8x8 student grid pooled
        # 2x onto the teacher's 4x4.
        model={"init_path": str(runs["stage2"]), "overrides": {"max_image_size": 64}},
        train={"output_dir": str(tmp / "sft_run"), "max_steps": 3},
    )
    runs["sft"] = run_stage("sft", ["--config", write_yaml(tmp / "s3.yaml", s3)])
    return tmp, runs


def test_runs_write_metrics(three_stages):
    tmp, runs = three_stages
    for stage, steps in (("stage1", 4), ("stage2", 2), ("sft", 3)):
        records = read_metrics(runs[stage].parent)
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        for r in records:
            assert {"step", "loss", "ce_loss", "align_loss", "lr", "tokens_per_s"} <= set(r)
            assert r["align_loss/timm:efficientnet_lite0"] == pytest.approx(r["align_loss"])  # weight 1
            assert r["loss"] == pytest.approx(r["ce_loss"] + r["align_loss"])
            assert all(math.isfinite(v) for v in r.values())
            assert 0.0 < r["align_loss"] < 2.0  # 1 - cosine lies in [0, 2]
    stage1 = read_metrics(runs["stage1"].parent)
    assert stage1[-1]["align_loss"] < stage1[0]["align_loss"]  # the PAL learns in 4 steps at lr 1e-3


def test_exports_load_and_chain(three_stages):
    from eve import EveForCausalLM, EveProcessor

    tmp, runs = three_stages
    for stage in ("stage1", "stage2", "sft"):
        export = runs[stage]
        assert export.name == "export"
        for name in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "processor_config.json",
            "aligner.safetensors",
            "aligner_config.json",
        ):
            assert (export / name).is_file(), f"{stage}: {name}"
        model = EveForCausalLM.from_pretrained(str(export))
        assert model.config.hidden_size == TINY_MODEL["hidden_size"]
        processor = EveProcessor.from_pretrained(str(export))
        size = 64 if stage == "sft" else TINY_MODEL["max_image_size"]
        assert model.config.max_image_size == size
        assert processor.image_processor.preprocess([draw(3)[0]])["image_grid_hw"].tolist() == [
            [size // 8] * 2
        ]
        assert processor.template == ("vicuna_v1" if stage == "sft" else "plain")
        PatchAligner.load(export)
    # Stage 1 leaves the LLM untouched; stage 2 changes it.
    s1 = EveForCausalLM.from_pretrained(str(runs["stage1"]))
    s2 = EveForCausalLM.from_pretrained(str(runs["stage2"]))
    torch.manual_seed(0)
    from eve import EveConfig

    fresh = EveForCausalLM(EveConfig.from_preset("tiny", **TINY_MODEL))  # the same seed as the run
    assert torch.equal(s1.model.layers[0].mlp.up_proj.weight, fresh.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(s1.vision_tower.conv.weight, fresh.vision_tower.conv.weight)
    assert not torch.equal(s2.model.layers[0].mlp.up_proj.weight, s1.model.layers[0].mlp.up_proj.weight)


def test_exported_model_generates(three_stages):
    from eve import EveForCausalLM, EveProcessor

    _, runs = three_stages
    model = EveForCausalLM.from_pretrained(str(runs["sft"])).eval()
    processor = EveProcessor.from_pretrained(str(runs["sft"]))
    image, _ = draw(0)
    prompt = processor.build_prompt("What colour is the shape?", has_image=True)
    inputs = processor([prompt], [image])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # Reference: a hand-written greedy loop over full forwards (no cache): argmax, stop at EOS, 3 steps.
    ids, want = inputs["input_ids"], []
    with torch.no_grad():
        for _ in range(3):
            logits = model(
                input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_hw=inputs["image_grid_hw"]
            ).logits
            token = int(logits[0, -1].argmax())
            want.append(token)
            if token == processor.tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == want


def test_missing_init_says_which_stage_to_run(tmp_path):
    tree = tiny_run_config(
        tmp_path, "stage2", data={"shards": ["x.tar"]}, model={"init_path": str(tmp_path / "nope")}
    )
    with pytest.raises(FileNotFoundError, match="run `make pretrain-stage1` first"):
        run_stage("stage2", ["--config", write_yaml(tmp_path / "c.yaml", tree)])


def test_stage_mismatch_is_an_error(tmp_path):
    tree = tiny_run_config(tmp_path, "stage1")
    with pytest.raises(ValueError, match="use train/pretrain_stage1.py"):
        run_stage("sft", ["--config", write_yaml(tmp_path / "c.yaml", tree)])


def test_7b_placeholder_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="Vicuna"):
        run_stage("stage1", ["--config", "configs/eve7b/stage1.yaml", "--train.output_dir", str(tmp_path)])


def test_lr_schedule_by_hand():
    fn = lr_lambda(total_steps=10, warmup_ratio=0.2, schedule="cosine", min_lr_ratio=0.0)
    assert [fn(s) for s in range(2)] == [0.5, 1.0]  # ceil(0.2 * 10) = 2 warm-up steps
    assert fn(2) == 1.0  # cosine starts at the peak
    assert fn(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert fn(10) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------
# Loss normalisation: the step's gradient does not depend on how the batch is split


def _samples_and_module(tiny_teachers):
    from eve import EveConfig, EveForCausalLM, EveProcessor
    from eve.assets import load_default_tokenizer
    from train.aligning import AlignerConfig, layers_for

    torch.manual_seed(0)
    model = EveForCausalLM(EveConfig.from_preset("tiny", **TINY_MODEL))
    aligner = PatchAligner(AlignerConfig(64, tiny_teachers.widths, layers_for(2, 1), 8))
    processor = EveProcessor.from_config(load_default_tokenizer(), model.config, "vicuna_v1")
    view = tiny_teachers.views[0]
    samples = []
    for i in range(4):
        image, caption = draw(i)
        if i == 2:  # a text-only sample with a long answer: unequal token counts per micro-batch
            conv = [{"from": "human", "value": "Describe a shape."}, {"from": "gpt", "value": caption * 3}]
            samples.append(processor.encode(conv))
            continue
        conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": caption}]
        enc = processor.encode(conv, image)
        enc.update(view.render([image]))
        samples.append(enc)
    return TrainModule(model, aligner), processor, samples


@pytest.mark.parametrize("packing", [True, False])
def test_split_into_micro_batches_gives_the_same_step(packing):
    """1 micro-batch of 4 == 4 micro-batches of 1 (different token counts each): same update, same loss."""
    from train.distributed import DistInfo
    from train.packing import Collator, DummyImage
    from train.teacher import TeacherConfig, build_teachers

    teachers = build_teachers([TeacherConfig(backend="timm", name="efficientnet_lite0", image_size=64)])
    dist_info = DistInfo(0, 1, 0, torch.device("cpu"))
    results = []
    for split in ([[0, 1, 2, 3]], [[0], [1], [2], [3]]):
        module, processor, samples = _samples_and_module(teachers)
        collate = Collator(
            pad_token_id=processor.pad_token_id,
            packing=packing,
            num_teacher_views=1,
            dummy_image=DummyImage.from_config(module.model.config, [64]),
        )
        micro = [
            collate([[samples[i] for i in group]] if packing else [samples[i] for i in group])
            for group in split
        ]
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        grads = {}
        names = {id(p): n for n, p in module.named_parameters()}

        def capture(opt, args, kwargs, grads=grads, names=names):  # the accumulated gradient, pre-update
            grads.update({names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"]})

        optimizer.register_step_pre_hook(capture)
        stats = Trainer(module, optimizer, teachers, dist_info, grad_clip=0.0).train_step(micro)
        results.append((stats, grads, micro))
    (a, ga, micro_a), (b, gb, micro_b) = results
    assert sum(count_loss_tokens(m) for m in micro_b) == count_loss_tokens(micro_a[0])
    # fp32 sums of the same terms in another order: ~1e-7 relative; 1e-5 leaves room for the
    # accumulation over 4 backward passes into one gradient buffer.
    assert b.ce_loss == pytest.approx(a.ce_loss, rel=1e-5)
    assert b.align_loss == pytest.approx(a.align_loss, rel=1e-5)
    for name in ga:
        # Relative to the tensor's largest entry: fp32 rounding of the differently ordered sums is
        # ~1e-7 of the magnitudes summed, so entries near zero need an absolute, scale-aware bound.
        err = (gb[name] - ga[name]).abs().max().item()
        assert err <= 1e-5 * ga[name].abs().max().item() + 1e-9, (name, err)


@pytest.mark.slow
def test_stage1_from_the_embedded_smollm2_gguf(tmp_path):
    """A real pretrained Llama-architecture LLM (GGUF) as the stage-1 start: CE far below uniform."""
    from eve.assets import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    shards = write_shards(tmp_path / "shards", n_samples=8, per_shard=8)
    vision = {k: v for k, v in TINY_MODEL.items() if k.startswith(("vision_", "max_image"))}
    tree = tiny_run_config(
        tmp_path,
        "stage1",
        data={"shards": shards},
        model={"overrides": vision, "llm_path": str(gguf.parent), "gguf_file": gguf.name},
        aligning={"layer_step": 10},
        train={"max_steps": 1},
    )
    export = run_stage("stage1", ["--config", write_yaml(tmp_path / "c.yaml", tree)])
    first = read_metrics(export.parent)[0]
    assert first["ce_loss"] < 0.7 * math.log(49152)  # a random LLM sits near log(vocab) = 10.8


def test_bf16_autocast_plain_path(three_stages, tmp_path):
    """model.dtype bfloat16 without DeepSpeed: fp32 master weights under bf16 autocast."""
    tmp, _ = three_stages
    tree = tiny_run_config(
        tmp_path,
        "stage1",
        data={"shards": [str(tmp / "shards" / "shard-*.tar")]},
        model={"dtype": "bfloat16"},
        train={"max_steps": 2},
    )
    export = run_stage("stage1", ["--config", write_yaml(tmp_path / "c.yaml", tree)])
    bf16, fp32 = read_metrics(export.parent), read_metrics(tmp / "stage1")
    # Same data, seed and first step; bf16 keeps ~3 significant digits: 1% on the first loss.
    assert bf16[0]["ce_loss"] == pytest.approx(fp32[0]["ce_loss"], rel=1e-2)
    assert bf16[0]["align_loss"] == pytest.approx(fp32[0]["align_loss"], rel=3e-2)
    from eve import EveForCausalLM

    assert EveForCausalLM.from_pretrained(str(export)).dtype == torch.float32
