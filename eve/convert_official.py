"""Import an official EVE-7B checkpoint (baaivision/EVE key layout) as an EveForCausalLM directory.

    python -m eve.convert_official --src /path/to/EVE-7B-v1.0 --dst runs/eve-7b [--preset eve-7b]

The official checkpoints also ship the CLIP teacher (`model.vision_clip.*`) and the patch aligning
layer (`model.vision_tower_compressor.*`): training-only parts, dropped here with a message.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import initialization as init

from eve.backbones import TEXT_FIELDS
from eve.configuration_eve import PRESETS, EveConfig
from eve.console import setup_logging
from eve.modeling_eve import EveForCausalLM

logger = logging.getLogger(__name__)

# Official key (regex) -> ours. The official PEL (VisionTokenizer) builds q/kv as
# nn.Sequential(LayerNorm, Linear), so index 0 is the norm and 1 the projection.
KEY_MAP: list[tuple[str, str]] = [
    (r"^model\.vision_tower\.patch_embedding\.weight$", "vision_tower.conv.weight"),
    (r"^model\.vision_tower\.(class|split)_embedding$", r"vision_tower.\1_embedding"),
    (
        r"^model\.vision_tower\.(local|global)_attention\.q\.0\.(weight|bias)$",
        r"vision_tower.\1_attention.q_norm.\2",
    ),
    (
        r"^model\.vision_tower\.(local|global)_attention\.q\.1\.weight$",
        r"vision_tower.\1_attention.q_proj.weight",
    ),
    (
        r"^model\.vision_tower\.(local|global)_attention\.kv\.0\.(weight|bias)$",
        r"vision_tower.\1_attention.kv_norm.\2",
    ),
    (
        r"^model\.vision_tower\.(local|global)_attention\.kv\.1\.weight$",
        r"vision_tower.\1_attention.kv_proj.weight",
    ),
    (
        r"^model\.vision_tower\.(local|global)_attention\.proj\.(weight|bias)$",
        r"vision_tower.\1_attention.out_proj.\2",
    ),
    (r"^model\.mm_projector\.0\.(weight|bias)$", r"vision_tower.projector.fc1.\1"),
    (r"^model\.mm_projector\.2\.(weight|bias)$", r"vision_tower.projector.fc2.\1"),
    (r"^(model\.(embed_tokens|layers|norm)\..*)$", r"\1"),
    (r"^(lm_head\.weight)$", r"\1"),
]
# Training-only or derived tensors of the official checkpoints that have no place in ours.
DROPPED: list[tuple[str, str]] = [
    (r"^model\.vision_clip\.", "the frozen CLIP teacher (training only; not part of an exported EVE)"),
    (r"^model\.vision_tower_compressor\.", "the patch aligning layer (training only; lives in train/)"),
    (r"\.rotary_emb\.inv_freq$", "RoPE frequencies (recomputed from the config)"),
]


def convert_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official EVE state dict to EveForCausalLM keys; drop teacher/aligner keys with a log line."""
    ours: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    unknown = []
    for key, tensor in official.items():
        reason = next((why for pattern, why in DROPPED if re.search(pattern, key)), None)
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        for pattern, target in KEY_MAP:
            if re.match(pattern, key):
                ours[re.sub(pattern, target, key)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys of the official checkpoint have no EVE counterpart, e.g. {unknown[:5]}; "
            "is this an EVE-7B (v1) checkpoint?"
        )
    for reason, count in dropped.items():
        logger.info("Dropped %d tensors: %s.", count, reason)
    return ours


def config_from_official(
    official_config: dict, state_dict: dict[str, torch.Tensor], preset: str
) -> EveConfig:
    """EveConfig from an official config.json: LLM fields copied, vision fields from the weights and the preset."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    text = {k: v for k, v in official_config.items() if k in TEXT_FIELDS}
    if "rope_theta" in official_config and "rope_parameters" not in text:  # transformers 4 layout
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": official_config["rope_theta"]}
    conv = state_dict["vision_tower.conv.weight"]  # (C, 3, p, p)
    vision = {k: v for k, v in PRESETS[preset].items() if k.startswith(("vision_", "max_image"))}
    vision.update(vision_hidden_size=conv.shape[0], vision_patch_size=conv.shape[-1])
    return EveConfig(
        **{**text, **vision, "mm_projector_type": official_config.get("mm_projector_type", "mlp2x_gelu")}
    )


def load_shards(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir: *.safetensors, else *.bin / *.pt via torch.load(weights_only=True)."""
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin")) + sorted(src.glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors, *.bin or *.pt weights found in {src}.")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state.update(load_file(str(path)))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return state


def load_official(model: EveForCausalLM, official: dict[str, torch.Tensor]) -> EveForCausalLM:
    """Load an official-layout state dict into an existing EveForCausalLM (strict: every weight must match)."""
    state = convert_state_dict(official)
    if model.config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


def convert_checkpoint(src: str | Path, dst: str | Path, preset: str = "eve-7b") -> Path:
    """Official EVE checkpoint dir -> EveForCausalLM save_pretrained dir (+ tokenizer files copied)."""
    src, dst = Path(src), Path(dst)
    official_config = json.loads((src / "config.json").read_text())
    official = load_shards(src)
    state = convert_state_dict(official)
    config = config_from_official(official_config, state, preset)
    dtype = state["model.embed_tokens.weight"].dtype
    with init.no_init_weights():  # every weight comes from the checkpoint
        model = EveForCausalLM._from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(dst)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    logger.info("Converted %s -> %s (%d tensors, %s).", src, dst, len(state), dtype)
    return dst


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m eve.convert_official --src DIR --dst DIR [--preset eve-7b|eve-7b-hd]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", required=True, help="official EVE checkpoint directory (config.json + shards)"
    )
    parser.add_argument("--dst", required=True, help="output directory for EveForCausalLM.save_pretrained")
    parser.add_argument(
        "--preset", default="eve-7b", choices=sorted(PRESETS), help="vision preset (image size)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    convert_checkpoint(args.src, args.dst, args.preset)


if __name__ == "__main__":
    main()
