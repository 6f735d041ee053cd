"""Import an official EVE v1 or EVEv2 checkpoint (baaivision/EVE key layouts) as an EveForCausalLM directory.

    python -m eve.convert_official --src /path/to/EVE-7B-v1.0 --dst runs/eve-7b
    python -m eve.convert_official --src /path/to/EVE-7B-HD-v2.0 --dst runs/eve2-7b-hd --preset eve2-7b-hd

The layout is told from the keys (`detect_layout`) and picks the default preset (`eve-7b`, `eve2-7b`),
which gives the vision fields the weights do not hold. EVE v1 checkpoints also ship the CLIP teacher
(`model.vision_clip.*`) and the patch aligning layer (`model.vision_tower_compressor.*`): training-only
parts, dropped here with a message. EVEv2 checkpoints hold the LLM, the visual copies of its layers and the
patch embedding only.
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
from eve.modality_layers import SPLIT_PARTS
from eve.modeling_eve import EveForCausalLM
from eve.official_keys import LAYOUTS, detect_layout

logger = logging.getLogger(__name__)


def convert_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official EVE v1 / EVEv2 state dict to EveForCausalLM keys; drop training-only keys with a log line."""
    layout = LAYOUTS[detect_layout(official)]
    ours: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    unknown = []
    for key, tensor in official.items():
        reason = next((why for pattern, why in layout.dropped if re.search(pattern, key)), None)
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        for pattern, target in layout.key_map:
            if re.match(pattern, key):
                ours[re.sub(pattern, target, key)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys of the official checkpoint have no EVE counterpart in the {layout.name} "
            f"layout, e.g. {unknown[:5]}; only baaivision/EVE checkpoints of EVE v1 and EVEv2 convert."
        )
    for reason, count in dropped.items():
        logger.info("Dropped %d tensors: %s.", count, reason)
    return ours


def config_from_official(
    official_config: dict,
    state_dict: dict[str, torch.Tensor],
    preset: str,
    max_image_size: int | None = None,
) -> EveConfig:
    """EveConfig from an official config.json: LLM fields copied, vision fields from the weights and the preset
    (max_image_size, when given, replaces the preset's)."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    if official_config.get("use_sliding_window"):
        raise ValueError(
            "The official config enables sliding-window attention, which the importer does not map."
        )
    text = {k: v for k, v in official_config.items() if k in TEXT_FIELDS}
    if "rope_theta" in official_config and "rope_parameters" not in text:  # transformers 4 layout
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": official_config["rope_theta"]}
    # The preset's other fields: backbone, front-end, image sizing; the weights then fix the sizes they hold.
    fields = {k: v for k, v in PRESETS[preset].items() if k not in TEXT_FIELDS}
    if max_image_size is not None:
        fields["max_image_size"] = max_image_size
    conv = state_dict["vision_tower.conv.weight"]  # (C, 3, p, p)
    fields.update(vision_hidden_size=conv.shape[0], vision_patch_size=conv.shape[-1])
    if fields.get("vision_frontend") == "pel2":  # EVEv2's second conv (D, C, s, s) merges s x s patches
        fields["vision_conv_stride"] = state_dict["vision_tower.projector.weight"].shape[-1]
    # The split parts are those with visual copies in the weights (the official config's `moe_part`).
    visual = {k.split(".visual.")[1].split(".")[0] for k in state_dict if ".visual." in k}
    fields["modality_split"] = [part for part, names in SPLIT_PARTS.items() if names[0] in visual]
    projector_type = official_config.get("mm_projector_type", "mlp2x_gelu")
    return EveConfig(**{**text, **fields, "mm_projector_type": projector_type})


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


TOKENIZER_FILES = (
    "tokenizer.model",  # SentencePiece (Vicuna, EVE v1)
    "vocab.json",  # byte-level BPE (Qwen2.5, EVEv2)
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def convert_checkpoint(
    src: str | Path, dst: str | Path, preset: str | None = None, max_image_size: int | None = None
) -> Path:
    """Official EVE v1 / EVEv2 checkpoint dir -> EveForCausalLM save_pretrained dir (+ tokenizer files copied)."""
    src, dst = Path(src), Path(dst)
    official_config = json.loads((src / "config.json").read_text())
    official = load_shards(src)
    frontend = detect_layout(official)
    layout = LAYOUTS[frontend]
    preset = preset or layout.preset
    if PRESETS.get(preset, {}).get("vision_frontend", "pel") != frontend:
        raise ValueError(
            f"{src} holds an {layout.name} checkpoint, which preset {preset!r} does not describe; "
            f"pass --preset {layout.preset} (or another preset with vision_frontend {frontend!r})."
        )
    state = convert_state_dict(official)
    config = config_from_official(official_config, state, preset, max_image_size)
    dtype = state["model.embed_tokens.weight"].dtype
    with init.no_init_weights():  # every weight comes from the checkpoint
        model = EveForCausalLM._from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    logger.info("Converted %s (%s) -> %s (%d tensors, %s).", src, layout.name, dst, len(state), dtype)
    logger.info(
        "Images are sized to %d px (preset %s; --max-image-size sets it).", config.max_image_size, preset
    )
    return dst


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m eve.convert_official --src DIR --dst DIR [--preset NAME] [--max-image-size PX]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", required=True, help="official EVE checkpoint directory (config.json + shards)"
    )
    parser.add_argument("--dst", required=True, help="output directory for EveForCausalLM.save_pretrained")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="vision preset (default: eve-7b or eve2-7b, after the checkpoint's layout)",
    )
    parser.add_argument(
        "--max-image-size",
        type=int,
        help="image size in px, overriding the preset's (EVE-7B-HD-v2.0 was trained at 1600)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    convert_checkpoint(args.src, args.dst, args.preset, args.max_image_size)


if __name__ == "__main__":
    main()
