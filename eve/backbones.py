"""The LLM backbones an EVE model can hold (`EveConfig.backbone`) and loading a plain LLM to start from.

| backbone | decoder | attention projections | used by |
|---|---|---|---|
| `llama` | transformers `LlamaModel` | q/k/v/o, bias per `attention_bias` (off) | EVE v1 (Vicuna-7B v1.5) |
| `qwen2` | transformers `Qwen2Model` | q/k/v with bias, o without | EVEv2 (Qwen2.5-7B-Instruct) |

Both read the same EveConfig text fields (width, layers, heads, GQA, `rope_parameters`, eps); Qwen2 also
reads `layer_types` and `sliding_window`. The decoder is built on the EveConfig itself, so the attention
backend chosen on the model (`attn_implementation`) is the one the decoder uses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedModel,
    Qwen2Model,
)
from transformers import initialization as init

BACKBONES: dict[str, type[PreTrainedModel]] = {"llama": LlamaModel, "qwen2": Qwen2Model}
"""EveConfig.backbone -> the transformers decoder (embeddings, layers, final norm, rotary embedding)."""

# The config fields that describe the text model (not generic PreTrainedConfig settings); a source LLM's
# config gives those it has (Qwen2 has no attention_bias, mlp_bias, head_dim or pretraining_tp).
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
)
QWEN2_FIELDS = ("layer_types", "sliding_window")
"""Read from a Qwen2 source only (a Qwen2 config sets sliding_window to None when no layer slides)."""


def build_backbone(config) -> nn.Module:
    """The decoder that `config.backbone` names, built on `config` itself."""
    return BACKBONES[config.backbone](config)


def load_llm(
    path_or_model: str | Path | PreTrainedModel,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> PreTrainedModel:
    """A plain causal LM (Llama or Qwen2) from a directory, a GGUF file (Llama) or an in-memory model."""
    if isinstance(path_or_model, PreTrainedModel):
        llm = path_or_model
    elif gguf_file:
        llm = load_gguf_llama(Path(path_or_model), gguf_file)
    else:
        load_kwargs = {"dtype": dtype} if dtype is not None else {}
        llm = AutoModelForCausalLM.from_pretrained(str(path_or_model), **load_kwargs)
    if llm.config.model_type not in BACKBONES:
        raise ValueError(
            f"from_llm needs a Llama-architecture (Llama, Vicuna, SmolLM2) or Qwen2-architecture (Qwen2, "
            f"Qwen2.5) LLM; got model_type {llm.config.model_type!r} from {path_or_model!r}."
        )
    return llm


def text_fields(llm_config) -> dict:
    """The EveConfig text fields of a source LLM's config, `backbone` included."""
    backbone = llm_config.model_type
    names = TEXT_FIELDS + (QWEN2_FIELDS if backbone == "qwen2" else ())
    fields = {k: getattr(llm_config, k) for k in names if hasattr(llm_config, k)}
    return {**fields, "backbone": backbone}


def load_gguf_llama(directory: Path, gguf_file: str) -> LlamaForCausalLM:
    """A LlamaForCausalLM from a GGUF file (dequantised to fp32) without the accelerate dependency."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # needs the gguf package

    path = directory / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found (gguf_file is relative to {directory}).")
    config = LlamaConfig.from_pretrained(str(directory), gguf_file=gguf_file)
    with init.no_init_weights():  # every weight comes from the file
        llm = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=llm)["tensors"]
    missing, unexpected = llm.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise ValueError(
            f"GGUF file {path} does not hold a Llama model: missing {missing}, unexpected {unexpected}."
        )
    llm.tie_weights()
    return llm
