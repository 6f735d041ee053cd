"""EVE: encoder-free vision-language models (model library; knows nothing about training)."""

from importlib import import_module
from typing import Any

# Public name -> module that defines it. Imported on first use so that `import eve` stays cheap.
_EXPORTS = {
    "EveConfig": "eve.configuration_eve",
    "PRESETS": "eve.configuration_eve",
    "EveForCausalLM": "eve.modeling_eve",
    "EvePatchEmbedding": "eve.patch_embedding",
    "EveImageProcessor": "eve.image_processing_eve",
    "EncoderImageProcessor": "eve.image_processing_encoders",
    "EveProcessor": "eve.processing_eve",
    "TEMPLATES": "eve.templates",
    "get_template": "eve.templates",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eve' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
