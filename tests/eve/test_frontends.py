"""Vision front-ends (pel, encoders + every connector) against independent references: transformers'
own vision models and CLIP image processor, hand-computed pixels, one-by-one generation, reloads."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip import CLIPImageProcessorPil

from eve import EncoderImageProcessor, EveConfig, EveForCausalLM, EveProcessor, inference
from eve.configuration_eve import CLIP_MEAN, PRESETS
from eve.patch_embedding import Projector
from tests.conftest import TINY_OVERRIDES, direct_answer

# Tiny random transformers encoders, each a 4 x 4 patch grid at 32 px (patch 8).
HF_ENCODERS = {
    "clip": (
        CLIPVisionModel,
        CLIPVisionConfig,
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
    ),
    "dinov2": (Dinov2Model, Dinov2Config, dict(hidden_size=24, mlp_ratio=2, num_attention_heads=4)),
    "siglip": (
        SiglipVisionModel,
        SiglipVisionConfig,
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
    ),
}


@pytest.fixture(scope="module")
def encoder_root(tmp_path_factory):
    """A folder with one saved tiny random model directory per transformers kind."""
    root = tmp_path_factory.mktemp("encoders")
    for name, (model_cls, config_cls, sizes) in HF_ENCODERS.items():
        torch.manual_seed(len(name))
        config = config_cls(num_hidden_layers=2, image_size=32, patch_size=8, **sizes)
        model_cls(config).save_pretrained(root / name)
    return root


def encoder(root, kind: str, layers=(-2,), size: int = 32) -> dict:
    """An EncoderSpec dict: a saved tiny transformers encoder, or the embedded efficientnet-lite0."""
    if kind == "lite0":  # stride-16 map (4 x 4 x 112 at 64 px), real ImageNet weights
        return dict(kind="timm", name="efficientnet_lite0", layers=list(layers), image_size=64)
    return dict(kind=f"hf_{kind}", path=str(root / kind), layers=list(layers), image_size=size)


def frontend_fields(name: str, root) -> dict:
    """EveConfig fields of each front-end under test, on the tiny LLM."""
    sva = dict(connector="sva", sva_width=32, sva_heads=4, sva_depth=1, sva_query_grid=[2, 2])
    pargo = dict(connector="pargo", pargo_partial=4, pargo_global=2, pargo_width=32, pargo_heads=4)
    table = {
        "mlp2x_gelu": ([encoder(root, "clip")], dict(connector="mlp2x_gelu")),
        "comm": ([encoder(root, "clip", [1, 2]), encoder(root, "dinov2", [1, 2])], dict(connector="comm")),
        "mof_interleaved": (
            [encoder(root, "clip"), encoder(root, "lite0")],
            dict(connector="mof_interleaved"),
        ),
        "mof_additive": (
            [encoder(root, "siglip", [-1]), encoder(root, "dinov2")],
            dict(connector="mof_additive", mof_alpha=0.3),
        ),
        # lite0 4 x 4 (2 x 2 windows) and DINOv2 at 64 px, 8 x 8 (4 x 4 windows, positions interpolated)
        "sva": ([encoder(root, "lite0"), encoder(root, "dinov2", size=64)], sva),
        "pargo": ([encoder(root, "clip")], {**pargo, "pargo_ffn": 64, "pargo_layers": 2}),
    }
    if name == "pel":
        return {}
    encoders, connector = table[name]
    return dict(vision_frontend="encoders", vision_encoders=encoders, vision_connector=connector)


FRONTENDS = ["pel", "mlp2x_gelu", "comm", "mof_interleaved", "mof_additive", "sva", "pargo"]
# Tokens per image, by hand from each connector's rule: mlp/comm/MoF-additive keep the 4 x 4 grid, MoF
# interleaved alternates two grids, SVA has a 2 x 2 query grid, ParGo 4 partial + 2 global queries.
CONNECTOR_TOKENS = {
    "mlp2x_gelu": 16,
    "comm": 16,
    "mof_interleaved": 32,
    "mof_additive": 16,
    "sva": 4,
    "pargo": 6,
}
IMAGES = {  # a wide and a tall image with different content (the PEL gives them different runs)
    "wide": Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 32, 3), dtype=np.uint8)),
    "tall": Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 24, 3), dtype=np.uint8)),
}


@pytest.fixture(scope="module")
def built(encoder_root, tokenizer):
    """name -> (model, processor), built once per front-end (seeded; eval mode; do not modify)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            config = EveConfig.from_preset("tiny", **TINY_OVERRIDES, **frontend_fields(name, encoder_root))
            torch.manual_seed(0)
            model = EveForCausalLM(config).eval()
            cache[name] = model, EveProcessor.from_config(tokenizer, config)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(built, encoder_root, tmp_path_factory):
    """name -> an export directory (model + processor) whose encoders differ from their source weights."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model, processor = built(name)
            model = copy.deepcopy(model)
            if name != "pel":
                # As if the encoders had been trained: reloading their source weights would show.
                with torch.no_grad():
                    for p in model.vision_tower.encoders.parameters():
                        p.add_(0.01 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(f"export_{name}")
            model.save_pretrained(path)
            processor.save_pretrained(path)
            cache[name] = path, model
        return cache[name]

    return get


def image_batch(processor, labels: bool = False):
    """A left-padded generation batch: wide image, text only, tall image (plus LM labels when asked)."""
    prompts = [processor.build_prompt(q, has_image=im is not None) for q, im in QUESTIONS]
    batch = processor(prompts, [im for _, im in QUESTIONS])
    if labels:
        ids = batch["input_ids"]
        batch["labels"] = ids.masked_fill((batch["attention_mask"] == 0) | (ids < 0), -100)  # text only
    return batch


QUESTIONS = [
    ("What is in the picture?", IMAGES["wide"]),
    ("Tell me a story.", None),
    ("Shape?", IMAGES["tall"]),
]


@pytest.mark.parametrize("name", FRONTENDS)
def test_frozen_encoders_get_no_gradient_and_the_connector_does(built, name):
    model, processor = built(name)
    model = copy.deepcopy(model).train()
    tower = model.vision_tower
    trained = tower.connector if name != "pel" else tower  # the PEL trains whole
    encoders = list(tower.encoders) if name != "pel" else []
    batch = image_batch(processor, labels=True)
    bn_before = [b.clone() for e in encoders for n, b in e.named_buffers() if "running_mean" in n]
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())
    assert all(not p.requires_grad and p.grad is None for e in encoders for p in e.parameters())
    # Frozen means inference mode too: BatchNorm statistics (efficientnet-lite0) do not move.
    bn_after = [b for e in encoders for n, b in e.named_buffers() if "running_mean" in n]
    assert all(torch.equal(a, b) for a, b in zip(bn_before, bn_after))
    # Unfrozen, the same encoders do learn: the freezing, not a cut graph, kept them still above.
    for e in encoders:
        e.requires_grad_(True)
    model.zero_grad()
    model.train()(**batch).loss.backward()
    for e in encoders:
        assert e.training and any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())


@pytest.mark.parametrize("name", FRONTENDS)
def test_image_tokens_per_image(built, name):
    model, processor = built(name)
    batch = processor([processor.build_prompt("Hi", has_image=True)] * 2, [IMAGES["wide"], IMAGES["tall"]])
    runs = (batch["input_ids"] == model.config.image_token_index).sum(1).tolist()
    if name == "pel":
        # 32 px long side, 8-px tokens: wide 2 x 4 -> 1 + 2*5; tall 4 x 3 (24 * 32/40 = 19.2 -> 24 px) -> 1 + 4*4
        assert runs == [11, 17]
        return
    tower = model.vision_tower
    grids = [e.grid for e in tower.encoders]
    assert runs == [CONNECTOR_TOKENS[name]] * 2 == [tower.connector.num_tokens(grids)] * 2
    with torch.no_grad():
        out = tower(batch["pixel_values"], batch["image_grid_hw"])
    assert out.shape == (2 * CONNECTOR_TOKENS[name], model.config.hidden_size)
    assert batch["image_grid_hw"].tolist() == [[1, CONNECTOR_TOKENS[name]]] * 2
    # A run one token short, or pixels not made for these encoders: errors that say what was expected.
    ids = batch["input_ids"].clone()
    ids[0, int((ids[0] == model.config.image_token_index).nonzero()[0])] = 0
    with pytest.raises(ValueError, match="T connector tokens each"):
        model(**{**batch, "input_ids": ids})
    with pytest.raises(ValueError, match="EncoderImageProcessor"):
        tower(batch["pixel_values"][:, :-1], batch["image_grid_hw"])


@pytest.mark.parametrize("name", FRONTENDS)
def test_save_and_load_without_the_encoder_paths(exported, built, encoder_root, name):
    path, saved = exported(name)
    _, processor = built(name)
    batch = image_batch(processor)
    moved = encoder_root.with_name(encoder_root.name + "_moved")
    encoder_root.rename(moved)  # the encoders' source directories are gone while loading
    try:
        loaded = EveForCausalLM.from_pretrained(path).eval()
        auto = AutoModelForCausalLM.from_pretrained(path).eval()
        reloaded_processor = EveProcessor.from_pretrained(path)
    finally:
        moved.rename(encoder_root)
    assert isinstance(auto, EveForCausalLM)
    ours, theirs = saved.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not any(
        p.requires_grad for e in getattr(loaded.vision_tower, "encoders", []) for p in e.parameters()
    )
    again = reloaded_processor(batch_prompts(processor), [im for _, im in QUESTIONS])
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    with torch.no_grad():
        reference = saved.eval()(**batch).logits
        # Loaded weights are memory-mapped at another alignment, so the CPU GEMM may round differently
        # (~1 ulp, see test_modeling); equal weights are checked bit for bit above.
        for model in (loaded, auto):
            torch.testing.assert_close(model(**batch).logits, reference, atol=1e-6, rtol=0)


def batch_prompts(processor):
    return [processor.build_prompt(q, has_image=im is not None) for q, im in QUESTIONS]


@pytest.mark.parametrize("name", FRONTENDS)
def test_batched_generation_equals_one_by_one(exported, name):
    """eve.inference (what eve.chat and eve.eval run) on the export: a left-padded batch == each alone."""
    path, _ = exported(name)
    model, processor = inference.load_model(path, device="cpu")
    prompts, images = batch_prompts(processor), [im for _, im in QUESTIONS]
    batched = inference.generate(model, processor, prompts, images, max_new_tokens=4)
    reference = [direct_answer(model, processor, p, im, max_new_tokens=4) for p, im in zip(prompts, images)]
    assert batched == reference and all(reference)
    order = inference.length_order(prompts, images, processor.image_processor)
    assert (
        inference.generate_all(model, processor, prompts, images, batch_size=2, max_new_tokens=4, order=order)
        == reference
    )


def test_mlp_frontend_equals_transformers_clip_and_its_image_processor(built, encoder_root):
    """LLaVA-1.5's path by hand: expand2square with the mean colour, CLIP's own (PIL) image processor,
    CLIPVisionModel.hidden_states[-2] without CLS, then the mlp2x_gelu."""
    model, processor = built("mlp2x_gelu")
    image = IMAGES["tall"]
    canvas = Image.new("RGB", (40, 40), tuple(int(m * 255) for m in CLIP_MEAN))
    canvas.paste(image, ((40 - 24) // 2, 0))
    reference_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    pixels = reference_processor(canvas, return_tensors="pt")["pixel_values"]  # (1, 3, 32, 32)
    ours = processor.image_processor([image])["pixel_values"]
    torch.testing.assert_close(ours, pixels.flatten(1), atol=0, rtol=0)  # same PIL resize, same float ops
    clip = CLIPVisionModel.from_pretrained(encoder_root / "clip").eval()
    connector = model.vision_tower.connector
    with torch.no_grad():
        features = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = connector.proj.fc2(torch.nn.functional.gelu(connector.proj.fc1(features)))[0]
        got = model.vision_tower(ours, torch.tensor([[1, 16]]))
    assert isinstance(connector.proj, Projector)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)  # the same modules; summation order only


def view(values, mean, std):
    """Hand normalisation of uint8 values (3, H, W) -> float."""
    x = torch.tensor(values, dtype=torch.float32) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_pad_to_square_with_the_mean_colour_hand_computed():
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.5, 0.25)
    fill = [127, 63, 191]  # int(mean * 255)
    processor = EncoderImageProcessor(
        views=[dict(image_size=4, image_mean=mean, image_std=std)], num_tokens=1
    )
    # A 4 x 2 (W x H) image: pasted at row (4 - 2) // 2 = 1 of a 4 x 4 canvas, no resize (S = 4).
    rgb = np.arange(24, dtype=np.uint8).reshape(2, 4, 3) * 10
    got = processor([rgb])["pixel_values"].view(3, 4, 4)
    canvas = np.array([[fill] * 4, *rgb.tolist(), [fill] * 4]).transpose(2, 0, 1)  # (3, 4, 4)
    torch.testing.assert_close(got, view(canvas, mean, std), atol=1e-6, rtol=0)
    # A 2 x 3 image: pasted at column (3 - 2) // 2 = 0 of a 3 x 3 canvas, the fill on the right.
    processor.views[0]["image_size"] = 3
    rgb = np.full((3, 2, 3), 200, dtype=np.uint8)
    got = processor([rgb])["pixel_values"].view(3, 3, 3)
    canvas = np.array([[[200] * 3, [200] * 3, fill]] * 3).transpose(2, 0, 1)
    torch.testing.assert_close(got, view(canvas, mean, std), atol=1e-6, rtol=0)
    # "crop": the short side is already S = 2, so the centre 2 x 2 of a 6 x 2 image is columns 2..3.
    processor = EncoderImageProcessor(
        views=[dict(image_size=2, image_mean=mean, image_std=std, aspect="crop")], num_tokens=1
    )
    rgb = np.arange(36, dtype=np.uint8).reshape(2, 6, 3)
    got = processor([rgb])["pixel_values"].view(3, 2, 2)
    torch.testing.assert_close(got, view(rgb[:, 2:4].transpose(2, 0, 1), mean, std), atol=1e-6, rtol=0)


def test_presets_build_their_configs_and_the_tiny_one_its_model():
    """Every preset is a valid EveConfig; the tiny encoder preset builds with the embedded weights."""
    for name in PRESETS:
        EveConfig.from_preset(name)
    assert EveConfig.from_preset("llava-1.5-7b").vision_encoders[0]["layers"] == [-2]
    config = EveConfig.from_preset("tiny-encoders-mof", **TINY_OVERRIDES)
    processor = EncoderImageProcessor.from_config(config)
    assert processor.num_tokens == 2 * 8 * 8  # two 8 x 8 grids, interleaved
    assert [v["image_size"] for v in processor.views] == [128, 256]
    # (transformers wraps the ValueError of a config check in its own error class)
    with pytest.raises(Exception, match="vision_connector needs"):
        EveConfig.from_preset("tiny-encoders", vision_connector={"connector": "mlp2x_gelu", "llm_hidden": 8})
    with pytest.raises(Exception, match="unknown keys"):
        EveConfig.from_preset(
            "tiny-encoders", vision_encoders=[{"kind": "timm", "name": "x", "weights": "y"}]
        )


def test_open_clip_encoder_from_a_local_weights_file(tmp_path):
    """An open_clip tower (any registered architecture; a tiny one here) from a state-dict file, whole-CLIP
    or DataParallel-wrapped: its taps equal open_clip's own forward_intermediates without the CLS token."""
    open_clip = pytest.importorskip("open_clip")
    from eve.encoders import EncoderSpec, build_encoder, resolve_spec

    vision = dict(image_size=32, layers=2, width=32, patch_size=8, head_width=8)
    text = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)
    (tmp_path / "tiny-open-clip.json").write_text(
        json.dumps(dict(embed_dim=16, vision_cfg=vision, text_cfg=text))
    )
    open_clip.add_model_config(tmp_path / "tiny-open-clip.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-open-clip").eval()
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "w.pt"
    )
    spec = EncoderSpec(
        kind="open_clip", name="tiny-open-clip", path=str(tmp_path / "w.pt"), layers=[-2, -1], image_size=32
    )
    tower = build_encoder(resolve_spec(spec))
    tower.load_source_weights()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = reference.visual.forward_intermediates(
            x, indices=[-2, -1], output_fmt="NLC", intermediates_only=True
        )
        got = tower(x)
    assert (tower.width, tower.grid) == (32, (4, 4))
    for a, b in zip(got, want["image_intermediates"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same modules and weights, CLS already dropped
