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


@pytest.fixture
def processor(tokenizer, tiny_config):
    """An EveProcessor matching the tiny config (4-px patches, stride 2, long side 32) over the real tokenizer."""
    from eve import EveProcessor

    return EveProcessor.from_config(tokenizer, tiny_config)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A saved tiny random EveForCausalLM + EveProcessor (the layout of an `export/` directory)."""
    from eve import EveConfig, EveForCausalLM, EveProcessor

    path = tmp_path_factory.mktemp("tiny_export")
    config = EveConfig.from_preset("tiny", **TINY_OVERRIDES)
    torch.manual_seed(0)
    EveForCausalLM(config).eval().save_pretrained(path)
    EveProcessor.from_config(tokenizer, config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def loaded(tiny_checkpoint):
    """(model, processor) loaded once from the tiny checkpoint, on CPU in fp32 (do not modify them)."""
    from eve.inference import load_model

    return load_model(tiny_checkpoint, device="cpu")


@torch.no_grad()
def force_reply(model, token: int, eos: int):
    """Make `model` answer every prompt with exactly `token` then `eos` (known greedy continuations).

    The LM head reads only residual dims 0 and 1, which no layer writes (their rows of o_proj and
    down_proj are zero), so at a text position they hold the token embedding: (1, 0) for every
    token but `token`, whose embedding there is (1, 2). Logits are 0 except those of `token` (10 x
    dim 0) and `eos` (10 x dim 1): after any other token `token` wins, after `token` itself eos wins.
    Image positions never predict (prompts end in text), so the image does not matter.
    """
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[:2] = 0
        layer.mlp.down_proj.weight[:2] = 0
    embed = model.model.embed_tokens.weight
    embed[:, :2] = torch.tensor([1.0, 0.0])
    embed[token, :2] = torch.tensor([1.0, 2.0])
    model.model.norm.weight.fill_(1.0)
    head = model.lm_head.weight
    head.zero_()
    head[token, 0] = head[eos, 1] = 10.0  # x10: a clear margin over the zero logits of the rest
    return model


@torch.no_grad()
def direct_answer(model, processor, prompt: str, image=None, max_new_tokens: int = 3, **sampling) -> str:
    """The reference answer to one ready-made prompt: `model.generate` alone, cut after the prompt, decoded."""
    batch = processor([prompt], [image])
    eos, pad = processor.tokenizer.eos_token_id, processor.pad_token_id
    kwargs = dict(do_sample=False, eos_token_id=eos, pad_token_id=pad, max_new_tokens=max_new_tokens)
    out = model.generate(**batch, **{**kwargs, **sampling})
    return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
