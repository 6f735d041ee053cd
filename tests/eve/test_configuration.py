"""EveConfig: presets hold the paper's numbers, round-trip through AutoConfig, reject bad vision fields."""

import pytest
from transformers import AutoConfig

from eve import PRESETS, EveConfig


def test_eve_7b_preset_is_vicuna_7b_with_the_official_pel():
    """EVE-7B = Vicuna-7B v1.5 + C=1024, p=14, s=2, 8 heads, 672 px (the paper; docs/architecture.md)."""
    c = EveConfig.from_preset("eve-7b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
        4096,
        32,
        32,
        11008,
    )
    assert (c.vocab_size, c.rms_norm_eps, c.pad_token_id, c.max_position_embeddings) == (32000, 1e-5, 0, 4096)
    assert (c.vision_hidden_size, c.vision_patch_size, c.vision_conv_stride, c.vision_num_heads) == (
        1024,
        14,
        2,
        8,
    )
    assert (c.max_image_size, c.vision_attn_scale, c.mm_projector_type) == (672, "official", "mlp2x_gelu")
    assert c.image_token_index == -200
    assert EveConfig.from_preset("eve-7b-hd").max_image_size == 1344


def test_square_image_token_counts_match_the_paper():
    """672 px -> 24 x 24 grid -> 601 tokens; 1344 px -> 48 x 48 -> 2353 tokens."""
    for name, tokens in (("eve-7b", 601), ("eve-7b-hd", 2353)):
        c = EveConfig.from_preset(name)
        side = c.max_image_size // c.image_token_stride
        assert c.num_image_tokens(side, side) == tokens
    c = EveConfig.from_preset("tiny")
    assert [c.num_image_tokens(h, w) for h, w in [(1, 1), (3, 5), (5, 3)]] == [3, 19, 21]


def test_tiny_preset_and_overrides():
    """The tiny CPU preset and keyword overrides (the conftest fixture's route)."""
    c = EveConfig.from_preset("tiny")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
        256,
        4,
        4,
        688,
    )
    assert (c.vision_hidden_size, c.vision_num_heads, c.vision_patch_size, c.vision_conv_stride) == (
        128,
        8,
        4,
        2,
    )
    assert (c.max_image_size, c.pad_token_id, c.bos_token_id, c.eos_token_id) == (64, 0, 1, 2)
    c = EveConfig.from_preset("tiny", hidden_size=64, vision_attn_scale="head_dim")
    assert (c.hidden_size, c.vision_attn_scale) == (64, "head_dim")
    assert PRESETS["tiny"]["hidden_size"] == 256  # overrides never mutate the table
    with pytest.raises(ValueError, match="Unknown EVE preset"):
        EveConfig.from_preset("eve-13b")


def test_auto_config_round_trip(tmp_path, tiny_config):
    """save_pretrained -> AutoConfig.from_pretrained gives an EveConfig with the same fields."""
    tiny_config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EveConfig) and loaded.model_type == "eve"
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731 (the load path)
    assert strip(loaded.to_dict()) == strip(tiny_config.to_dict())


@pytest.mark.parametrize(
    "bad",
    [
        dict(vision_hidden_size=30, vision_num_heads=8),
        dict(vision_attn_scale="sqrt"),
        dict(mm_projector_type="linear"),
        dict(max_image_size=63),
        dict(image_token_index=5),
    ],
)
def test_invalid_vision_fields_are_rejected(bad):
    """Each vision field is validated at construction, with the field named in the message."""
    with pytest.raises(Exception, match=next(iter(bad))):
        EveConfig.from_preset("tiny", **bad)
