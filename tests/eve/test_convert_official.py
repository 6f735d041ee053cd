"""The official EVE-7B key layout loads onto EveForCausalLM and gives the same outputs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from eve import EveConfig, EveForCausalLM
from eve.convert_official import convert_state_dict, load_official, main
from eve.patch_embedding import patchify

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

# Small LLM, the tiny preset's PEL (C=128, 8 heads, p=4): `--preset tiny` restores the vision fields.
SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


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


@pytest.fixture
def source():
    """A random EVE with the tiny preset's PEL, perturbed so that no weight keeps its init value."""
    torch.manual_seed(0)
    model = EveForCausalLM(EveConfig.from_preset("tiny", **SMALL)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model


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
