"""Shared fixtures: tiny configs that run in well under a second on two CPU cores."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A tiny EVE: 2 Llama layers of width 64 over the real 32000-token Llama vocabulary, 4-px patches,
# conv stride 2, long side 32 px (a 4x4 token grid for a square image: 1 + 4*5 = 21 tokens).
TINY_OVERRIDES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_hidden_size=32,
    vision_num_heads=4,
    vision_patch_size=4,
    vision_conv_stride=2,
    max_image_size=32,
)


@pytest.fixture
def tiny_config():
    """A fresh tiny EveConfig (fp32, sdpa) per test."""
    from eve import EveConfig

    return EveConfig.from_preset("tiny", **TINY_OVERRIDES)


@pytest.fixture
def tiny_model(tiny_config):
    """A seeded tiny EveForCausalLM in eval mode."""
    from eve import EveForCausalLM

    torch.manual_seed(0)
    return EveForCausalLM(tiny_config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    """The real Llama-format SentencePiece tokenizer shipped by mistral-common (32000 tokens)."""
    from eve.assets import load_default_tokenizer

    return load_default_tokenizer()
