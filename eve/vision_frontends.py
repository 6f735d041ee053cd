"""Vision front-ends: how an image becomes LLM image tokens, one row of `FRONTENDS` chosen by
`EveConfig.vision_frontend`.

| front-end | module | `image_grid_hw` of an image | positions per image |
|---|---|---|---|
| `pel` | EvePatchEmbedding: EVE's patch embedding layer + projector | (h, w) tokens of the resized image | 1 + h*(w+1) |
| `pel2` | Eve2PatchEmbedding: EVEv2's Conv -> GELU -> Conv | (h, w) tokens of the resized image | 1 + h*(w+1) |
| `encoders` | EncoderFrontend: pretrained encoders (eve/encoders.py) + a connector (eve/connectors) | (1, T) | T = connector.num_tokens |

Both answer one interface, so EveForCausalLM, the processors, generate and training never ask which:

    frontend.num_image_tokens(h, w)                 # positions of one image with grid (h, w)
    frontend.layout(image_grid_hw)                  # the PEL's index plan (shared with the image-state
                                                    # hooks of the aligning layer); None for encoders
    frontend(pixel_values, image_grid_hw, layout)   # (sum of positions, D), images in order

The pixel format belongs to the front-end's image processor: packed patches for the PEL and EVEv2's
(EveImageProcessor), one row of square views per image for encoders (EncoderImageProcessor).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from eve.configuration_eve import EveConfig
from eve.connectors import ConnectorConfig, build_connector
from eve.encoders import EncoderSpec, build_encoder, resolve_spec
from eve.patch_embedding import Eve2PatchEmbedding, EvePatchEmbedding

CONNECTOR_DERIVED = ("llm_hidden", "encoder_widths", "encoder_grids", "encoder_layers")
"""ConnectorConfig fields that come from the encoders and the LLM, never from `vision_connector`."""


class EncoderFrontend(nn.Module):
    """Pretrained vision encoders (frozen by default) + a connector: T tokens of width D per image."""

    def __init__(self, config: EveConfig):
        super().__init__()
        specs = [resolve_spec(EncoderSpec(**entry)) for entry in config.vision_encoders]
        # The config keeps the resolved specs (HF vision configs included), so that config.json alone
        # rebuilds the architecture: from_pretrained never needs the original weights paths.
        config.vision_encoders = [dataclasses.asdict(spec) for spec in specs]
        # Frozen unless training unfreezes them (train/stages.py): built frozen, in eval mode.
        self.encoders = nn.ModuleList(build_encoder(spec) for spec in specs)
        self.view_sizes = [spec.image_size for spec in specs]
        cfg = ConnectorConfig(
            llm_hidden=config.hidden_size,
            encoder_widths=tuple(e.width for e in self.encoders),
            encoder_grids=tuple(e.grid for e in self.encoders),
            encoder_layers=tuple(len(spec.layers) for spec in specs),
            **config.vision_connector,
        )
        self.connector = build_connector(cfg)
        self.num_tokens = self.connector.num_tokens(cfg.encoder_grids)
        """T: connector tokens per image (the run length of every image in input_ids)."""

    run_rule = "h*w = T connector tokens"
    """num_image_tokens in words (for error messages)."""

    @staticmethod
    def num_image_tokens(h: int, w: int) -> int:
        """Positions of an image whose grid is (h, w) = (1, T): its T connector tokens."""
        return h * w

    def layout(self, image_grid_hw: torch.Tensor) -> None:
        """No index plan: every image is one run of T tokens (and no patch grid for the aligning layer)."""
        return None

    def freeze_encoders(self) -> None:
        """Frozen encoders, as built (from_pretrained hands parameters back with requires_grad on)."""
        self.encoders.requires_grad_(False)
        self.encoders.train(self.training)  # a frozen encoder stays in eval mode

    def forward(
        self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, layout: None = None
    ) -> torch.Tensor:
        """pixel_values (n, sum_e 3*S_e*S_e), image_grid_hw (n, 2) of (1, T) -> (n*T, D)."""
        n = image_grid_hw.shape[0]
        widths = [3 * s * s for s in self.view_sizes]
        grids = image_grid_hw.detach().to("cpu").tolist()
        if tuple(pixel_values.shape) != (n, sum(widths)) or any(g != [1, self.num_tokens] for g in grids):
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} and image_grid_hw {grids} do not fit this encoder "
                f"front-end: it needs ({n}, {sum(widths)}) (each image's views of {self.view_sizes} px) and "
                f"(1, {self.num_tokens}) per image. Build both with EncoderImageProcessor "
                "(EveProcessor.from_config does)."
            )
        views = pixel_values.split(widths, dim=1)  # one (n, 3*S*S) block per encoder
        features = [
            encoder(view.reshape(n, 3, size, size))  # taps, each (n, h_e*w_e, C_e)
            for encoder, view, size in zip(self.encoders, views, self.view_sizes)
        ]
        dtype = next(self.connector.parameters()).dtype
        tokens = self.connector([[f.to(dtype) for f in taps] for taps in features])  # (n, T, D)
        return tokens.flatten(0, 1)


FRONTENDS: dict[str, type[nn.Module]] = {
    "pel": EvePatchEmbedding,
    "pel2": Eve2PatchEmbedding,
    "encoders": EncoderFrontend,
}
"""EveConfig.vision_frontend -> module class."""


def build_frontend(config: EveConfig) -> nn.Module:
    """The vision front-end that `config.vision_frontend` names."""
    return FRONTENDS[config.vision_frontend](config)
