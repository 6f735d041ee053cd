"""The official EVE v1 and EVEv2 key layouts load onto EveForCausalLM and give the same outputs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from eve import EveConfig, EveForCausalLM
from eve.convert_official import convert_state_dict, load_official, main
from eve.official_keys import detect_layout
from eve.patch_embedding import patchify

# Small LLM, the tiny presets' vision fields (C=128, p=4): `--preset tiny` restores those the weights do not hold.
SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

# Ours -> the official baaivision/EVE names, written out by hand from the official VisionTokenizer
# (q/kv = nn.Sequential(LayerNorm, Linear), proj, patch_embedding, class/split_embedding) and the
# LLaVA-style mm_projector = nn.Sequential(Linear, GELU, Linear).
OURS_TO_OFFICIAL = {
    "vision_tower.conv.weight": "model.vision_tower.patch_embedding.weight",
    "vision_tower.class_embedding": "model.vision_tower.class_embedding",
    "vision_tower.split_embedding": "model.vision_tower.split_embedding",
    "vision_tower.projector.fc1.weight": "model.mm_projector.0.weight",
    "vision_tower.projector.fc1.bias": "model.mm_projector.0.bias",
    "vision_tower.projector.fc2.weight": "model.mm_projector.2.weight",
    "vision_tower.projector.fc2.bias": "model.mm_projector.2.bias",
}
for _block in ("local", "global"):
    for _ours, _official in [
        ("q_norm.weight", "q.0.weight"),
        ("q_norm.bias", "q.0.bias"),
        ("q_proj.weight", "q.1.weight"),
        ("kv_norm.weight", "kv.0.weight"),
        ("kv_norm.bias", "kv.0.bias"),
        ("kv_proj.weight", "kv.1.weight"),
        ("out_proj.weight", "proj.weight"),
        ("out_proj.bias", "proj.bias"),
    ]:
        OURS_TO_OFFICIAL[f"vision_tower.{_block}_attention.{_ours}"] = (
            f"model.vision_tower.{_block}_attention.{_official}"
        )

# EVEv2: ours -> the official names, by hand from its VisionTokenizer (patch_embedding =
# nn.Sequential(Conv2d, GELU, Conv2d), class/split_embedding) and its Qwen2 decoder layers with `add_moe`
# (self_attn.moe_{q,k,v,o}_proj, moe_mlp, moe_{input,post_attention}_layernorm). The LLM's keys are the same.
OURS_TO_OFFICIAL_EVE2 = {
    "vision_tower.conv.weight": "model.vision_tower.patch_embedding.0.weight",
    "vision_tower.conv.bias": "model.vision_tower.patch_embedding.0.bias",
    "vision_tower.projector.weight": "model.vision_tower.patch_embedding.2.weight",
    "vision_tower.projector.bias": "model.vision_tower.patch_embedding.2.bias",
    "vision_tower.class_embedding": "model.vision_tower.class_embedding",
    "vision_tower.split_embedding": "model.vision_tower.split_embedding",
}
for _layer in range(SMALL["num_hidden_layers"]):
    for _ours, _official in [
        ("visual.input_layernorm.weight", "moe_input_layernorm.weight"),
        ("visual.post_attention_layernorm.weight", "moe_post_attention_layernorm.weight"),
        ("visual.q_proj.weight", "self_attn.moe_q_proj.weight"),
        ("visual.q_proj.bias", "self_attn.moe_q_proj.bias"),
        ("visual.k_proj.weight", "self_attn.moe_k_proj.weight"),
        ("visual.k_proj.bias", "self_attn.moe_k_proj.bias"),
        ("visual.v_proj.weight", "self_attn.moe_v_proj.weight"),
        ("visual.v_proj.bias", "self_attn.moe_v_proj.bias"),
        ("visual.o_proj.weight", "self_attn.moe_o_proj.weight"),
        ("visual.mlp.gate_proj.weight", "moe_mlp.gate_proj.weight"),
        ("visual.mlp.up_proj.weight", "moe_mlp.up_proj.weight"),
        ("visual.mlp.down_proj.weight", "moe_mlp.down_proj.weight"),
    ]:
        OURS_TO_OFFICIAL_EVE2[f"model.layers.{_layer}.{_ours}"] = f"model.layers.{_layer}.{_official}"


def official_state_dict(model: EveForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under the official names, plus the teacher and aligner tensors an official file carries."""
    state = {OURS_TO_OFFICIAL.get(k, k): v.clone() for k, v in model.state_dict().items()}
    state["model.vision_clip.backbone.embeddings.patch_embedding.weight"] = torch.randn(8, 3, 14, 14)
    state["model.vision_tower_compressor.input_layer.weight"] = torch.randn(8, 64)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(8)
    return state


def inputs(config: EveConfig) -> dict[str, torch.Tensor]:
    """One image sample (16x24 px) between text tokens."""
    p, s = config.vision_patch_size, config.vision_conv_stride
    image = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(0))
    h, w = 16 // (p * s), 24 // (p * s)
    ids = [1, 319] + [config.image_token_index] * config.num_image_tokens(h, w) + [450, 3303]
    return dict(
        input_ids=torch.tensor([ids]),
        pixel_values=patchify(image, p, s),
        image_grid_hw=torch.tensor([[h, w]]),
    )


def perturbed(preset: str) -> EveForCausalLM:
    """A random EVE of the preset at SMALL size, perturbed so that no weight keeps its init value (visual
    copies included: they start as the text weights)."""
    torch.manual_seed(0)
    model = EveForCausalLM(EveConfig.from_preset(preset, **SMALL)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model


@pytest.fixture
def source():
    """A random EVE with the tiny preset's PEL."""
    return perturbed("tiny")


def test_every_official_vision_key_is_mapped(source):
    """The map covers every PEL/projector tensor and drops teacher, aligner and RoPE buffers."""
    ours = convert_state_dict(official_state_dict(source))
    assert set(ours) == set(source.state_dict())


def test_official_layout_loads_and_gives_the_same_outputs(source):
    """load_official into a fresh model: identical logits (same tensors, same ops)."""
    torch.manual_seed(1)
    fresh = EveForCausalLM(EveConfig.from_preset("tiny", **SMALL)).eval()
    load_official(fresh, official_state_dict(source))
    batch = inputs(source.config)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, source(**batch).logits)


def test_unknown_keys_are_refused(source):
    """A checkpoint of another layout is named, not silently half-loaded."""
    state = official_state_dict(source)
    state["model.vision_tower.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery"):
        convert_state_dict(state)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_cli_converts_a_checkpoint_directory(tmp_path, source, fmt):
    """`python -m eve.convert_official --src --dst` on safetensors or torch shards -> from_pretrained."""
    src, dst = tmp_path / "official", tmp_path / "ours"
    src.mkdir()
    state = official_state_dict(source)
    keys = sorted(state)
    shards = [
        dict((k, state[k].contiguous()) for k in keys[: len(keys) // 2]),
        {k: state[k] for k in keys[len(keys) // 2 :]},
    ]
    for i, shard in enumerate(shards):
        if fmt == "safetensors":
            save_file(shard, str(src / f"model-0000{i + 1}-of-00002.safetensors"))
        else:
            torch.save(shard, src / f"pytorch_model-0000{i + 1}-of-00002.bin")
    # An official config.json: transformers-4 Llama fields plus the LLaVA-style mm_* fields.
    official_config = {k: getattr(source.config, k) for k in ("vocab_size", "rms_norm_eps", "pad_token_id")}
    official_config |= {k: SMALL[k] for k in SMALL} | {"rope_theta": 10000.0, "max_position_embeddings": 2048}
    official_config |= {"model_type": "eve", "mm_hidden_size": 128, "mm_projector_type": "mlp2x_gelu"}
    official_config |= {"mm_vision_tower": "/path/to/preprocessor", "requires_cliploss": True}
    (src / "config.json").write_text(json.dumps(official_config))
    (src / "tokenizer.model").write_bytes(b"sentencepiece stand-in")

    main(["--src", str(src), "--dst", str(dst), "--preset", "tiny"])
    loaded = EveForCausalLM.from_pretrained(dst).eval()
    assert (dst / "tokenizer.model").exists()
    assert loaded.config.vision_hidden_size == 128 and loaded.config.vision_num_heads == 8
    batch = inputs(source.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, source(**batch).logits, atol=0, rtol=0)


# EVEv2: the tiny-eve2 preset (Qwen2 backbone, conv stack, every layer split) at SMALL size.


@pytest.fixture
def source2():
    """A random tiny EVEv2 whose visual copies differ from the text weights."""
    return perturbed("tiny-eve2")


def official_eve2_state_dict(model: EveForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under the official EVEv2 names (its checkpoints hold no teacher, aligner or RoPE buffer)."""
    return {OURS_TO_OFFICIAL_EVE2.get(k, k): v.clone() for k, v in model.state_dict().items()}


def test_every_official_eve2_key_is_mapped(source2):
    """The hand-written table renames every vision and visual-copy key; the importer maps them all back."""
    official = official_eve2_state_dict(source2)
    assert not any(".visual." in k or k.startswith("vision_tower.") for k in official)
    assert detect_layout(official) == "pel2"
    assert detect_layout(official_state_dict(perturbed("tiny"))) == "pel"
    ours = convert_state_dict(official)
    assert set(ours) == set(source2.state_dict())
    assert all(ours[k] is official[OURS_TO_OFFICIAL_EVE2.get(k, k)] for k in ours)  # renamed, not copied


def test_official_eve2_layout_loads_and_gives_the_same_outputs(source2):
    """load_official into a fresh tiny EVEv2: identical logits on an image between text tokens."""
    torch.manual_seed(1)
    fresh = EveForCausalLM(EveConfig.from_preset("tiny-eve2", **SMALL)).eval()
    load_official(fresh, official_eve2_state_dict(source2))
    batch = inputs(source2.config)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, source2(**batch).logits)


def test_unknown_eve2_keys_are_refused(source2):
    """A leftover of another variant (the gated MLP of the official merge_moe.py) is named, not passed through."""
    state = official_eve2_state_dict(source2)
    state["model.layers.0.mlp.moe_up_gate"] = torch.zeros(1)
    with pytest.raises(ValueError, match="moe_up_gate"):
        convert_state_dict(state)


def write_official_eve2(source2: EveForCausalLM, src) -> None:
    """An official EVEv2 directory: two safetensors shards, a Qwen2 config.json with the EVEv2 fields."""
    src.mkdir()
    state = official_eve2_state_dict(source2)
    keys = sorted(state)
    for i, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2 :]]):
        save_file(
            {k: state[k].contiguous() for k in part}, str(src / f"model-0000{i + 1}-of-00002.safetensors")
        )
    # transformers-4 Qwen2 fields, as Qwen2.5 ships them, plus what the official train.py sets.
    config = {k: getattr(source2.config, k) for k in ("vocab_size", "rms_norm_eps", "pad_token_id")}
    config |= SMALL | {"hidden_act": "silu", "rope_theta": 1000000.0, "max_position_embeddings": 2048}
    config |= {"sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28}
    config |= {"model_type": "eve-qwen2", "tie_word_embeddings": False, "mm_hidden_size": 128}
    config |= {"add_moe": True, "moe_part": "layernorm-self_attn-mlp", "mm_vision_tower": "/path/to/res1600"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "vocab.json").write_text("{}")  # the Qwen2 tokenizer's files are copied along


def test_cli_converts_an_eve2_directory(tmp_path, source2):
    """Without --preset the layout picks eve2-7b's fields; sizes and split come from the weights."""
    src, dst = tmp_path / "official", tmp_path / "ours"
    write_official_eve2(source2, src)
    main(["--src", str(src), "--dst", str(dst), "--max-image-size", "1600"])
    loaded = EveForCausalLM.from_pretrained(dst).eval()
    assert (dst / "vocab.json").exists()
    c = loaded.config
    assert (c.backbone, c.vision_frontend, c.image_resize_mode) == ("qwen2", "pel2", "area")
    assert (c.vision_hidden_size, c.vision_patch_size, c.vision_conv_stride) == (128, 4, 2)
    assert c.modality_split == ["layernorm", "self_attn", "mlp"] and c.max_image_size == 1600
    assert c.rope_parameters["rope_theta"] == 1000000.0 and c.sliding_window is None
    batch = inputs(source2.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, source2(**batch).logits, atol=0, rtol=0)


def test_cli_refuses_a_preset_of_the_other_layout(tmp_path, source2):
    """An EVEv2 checkpoint with an EVE v1 preset: the error names the preset to use."""
    src = tmp_path / "official"
    write_official_eve2(source2, src)
    with pytest.raises(ValueError, match="--preset eve2-7b"):
        main(["--src", str(src), "--dst", str(tmp_path / "ours"), "--preset", "tiny"])
