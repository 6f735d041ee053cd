"""EncoderImageProcessor: any image -> one square view per pretrained encoder (the encoder front-end).

Per image and encoder (`EncoderSpec.aspect`, default LLaVA-1.5's `image_aspect_ratio="pad"`):
1. load and convert to RGB as for the PEL (`as_rgb_image`: EXIF, modes, transparency on white);
2. "pad": paste the image centred on a square of its long side filled with the encoder's mean colour
   `int(mean * 255)` (LLaVA's expand2square, offset (long - short) // 2), then resize to S x S;
   "crop": resize the short side to S (the long side to int(S * long / short)) and cut the centre S x S;
3. normalise with the encoder's mean and std, channel-first.

Output: `pixel_values` (n, sum_e 3*S_e*S_e), each image's views flattened (3, S, S) and concatenated
in encoder order; `image_grid_hw` (n, 2), (1, T) for every image: its T connector tokens as one row,
the run that EveProcessor writes in place of its <image>.

`image_processor_from_config` / `image_processor_from_pretrained` pick the processor of a front-end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_base import BatchFeature, ImageProcessingMixin

from eve.image_processing_eve import RESAMPLE, EveImageProcessor, ImageInput, as_rgb_image


def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """LLaVA's expand2square: the image centred on a square of its long side, filled with int(mean * 255)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_and_crop(image: Image.Image, size: int, resample: str) -> Image.Image:
    """The short side resized to `size` (the CLIP image processor's rule), then the centre size x size."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new = (size, new_long) if width <= height else (new_long, size)
    image = image.resize(new, RESAMPLE[resample])
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class EncoderImageProcessorKwargs(TypedDict, total=False):
    """Settings accepted by EncoderImageProcessor (saved in preprocessor_config.json)."""

    views: list[dict[str, Any]]
    num_tokens: int


class EncoderImageProcessor(ImageProcessingMixin):
    """Images -> {"pixel_values": (n, sum_e 3*S_e*S_e), "image_grid_hw": (n, 2) of (1, T)}."""

    model_input_names = ["pixel_values", "image_grid_hw"]
    valid_kwargs = EncoderImageProcessorKwargs

    def __init__(self, views: Sequence[dict[str, Any]] = (), num_tokens: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        # One view per encoder: image_size, image_mean, image_std, resample, aspect (EncoderSpec fields).
        self.views = [
            dict(
                image_size=int(v["image_size"]),
                image_mean=[float(x) for x in v["image_mean"]],
                image_std=[float(x) for x in v["image_std"]],
                resample=v.get("resample", "bicubic"),
                aspect=v.get("aspect", "pad"),
            )
            for v in views
        ]
        self.num_tokens = int(num_tokens)
        if not self.views:
            raise ValueError("EncoderImageProcessor needs one view per encoder (build it with from_config).")
        for v in self.views:
            if v["resample"] not in RESAMPLE or v["aspect"] not in ("pad", "crop"):
                raise ValueError(
                    f"View {v}: resample must be one of {sorted(RESAMPLE)}, aspect 'pad' or 'crop'."
                )

    @classmethod
    def from_config(cls, config, **overrides) -> EncoderImageProcessor:
        """The processor of an encoder EveConfig: each encoder's view and the connector's token count."""
        from eve.vision_frontends import EncoderFrontend

        # The architecture only, on the meta device: no weights are read and no memory is used.
        with torch.device("meta"):
            frontend = EncoderFrontend(config)
        keys = ("image_size", "image_mean", "image_std", "resample", "aspect")
        views = [{k: getattr(e.spec, k) for k in keys} for e in frontend.encoders]
        return cls(**{"views": views, "num_tokens": frontend.num_tokens, **overrides})

    @property
    def resample(self) -> str:
        """The first view's filter (what a teacher view of the same image uses)."""
        return self.views[0]["resample"]

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        """(1, T) for any image size: an image is always T connector tokens."""
        return 1, self.num_tokens

    @staticmethod
    def num_image_tokens(h: int, w: int) -> int:
        """LLM positions of a (1, T) grid: T (equals EveConfig.num_image_tokens of an encoder config)."""
        return h * w

    def square_view(self, image: Image.Image, view: dict[str, Any]) -> torch.Tensor:
        """(3, S, S) float32 of one RGB image as one encoder sees it (padded or cropped, resized, normalised)."""
        size, resample = view["image_size"], view["resample"]
        if view["aspect"] == "pad":
            image = pad_to_square(image, view["image_mean"])
            if image.size != (size, size):
                image = image.resize((size, size), RESAMPLE[resample])
        else:
            image = resize_and_crop(image, size, resample)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()  # (3, S, S) in 0..255
        mean = torch.tensor(view["image_mean"]).view(3, 1, 1)
        std = torch.tensor(view["image_std"]).view(3, 1, 1)
        return (pixels / 255.0 - mean) / std

    def preprocess(self, images: ImageInput | Sequence[ImageInput], **kwargs) -> BatchFeature:
        """Images -> one row of concatenated views per image (n, sum 3*S*S) float32 and grids (n, 2) long."""
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}; set them on the processor instead.")
        if not isinstance(images, (list, tuple)):
            images = [images]
        rows = []
        for index, image in enumerate(images):
            rgb = as_rgb_image(image, index)
            rows.append(torch.cat([self.square_view(rgb, view).flatten() for view in self.views]))
        width = sum(3 * v["image_size"] ** 2 for v in self.views)
        pixel_values = torch.stack(rows) if rows else torch.empty(0, width)
        image_grid_hw = torch.tensor([[1, self.num_tokens]] * len(rows), dtype=torch.long).reshape(-1, 2)
        return BatchFeature({"pixel_values": pixel_values, "image_grid_hw": image_grid_hw})

    __call__ = preprocess


IMAGE_PROCESSORS: dict[str, type[ImageProcessingMixin]] = {
    "pel": EveImageProcessor,
    "pel2": EveImageProcessor,
    "encoders": EncoderImageProcessor,
}
"""EveConfig.vision_frontend -> its image processor class."""


def image_processor_from_config(config) -> EveImageProcessor | EncoderImageProcessor:
    """The image processor matching an EveConfig's vision front-end."""
    return IMAGE_PROCESSORS[config.vision_frontend].from_config(config)


def image_processor_from_pretrained(
    directory: str | os.PathLike,
) -> EveImageProcessor | EncoderImageProcessor:
    """The image processor saved in `directory`/preprocessor_config.json, of the class it names."""
    path = Path(directory) / "preprocessor_config.json"
    kind = json.loads(path.read_text()).get("image_processor_type", EveImageProcessor.__name__)
    classes = {cls.__name__: cls for cls in IMAGE_PROCESSORS.values()}
    if kind not in classes:
        raise ValueError(f"{path}: image_processor_type {kind!r} is not one of {sorted(classes)}.")
    return classes[kind].from_pretrained(str(directory))
