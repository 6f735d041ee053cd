"""EveImageProcessor: any image -> packed patches for the PEL.

Per image (the official `compute_basehw` rule, see docs/architecture.md):
1. load and convert to RGB (`load_image` / `to_rgb`): EXIF orientation applied; greyscale, 1-bit,
   palette, CMYK and YCbCr converted by Pillow; transparent images (RGBA, LA, PA, P or L with a
   transparency key) composited on **white** (Pillow's plain convert would leave the hidden colour
   under the alpha, often black); 16-bit greyscale (I;16*, I) divided by 257 (0..65535 -> 0..255),
   float (F) taken as 0..1 when its maximum is <= 1, else as 0..255.
2. resize (bicubic, as Pillow's default in the official code) so the long side is `max_image_size`
   (small images are up-scaled) and the short side is the ratio-preserving length **rounded up** to a
   multiple of `resize_multiple` (default p*s): we resize to the rounded size, a slight stretch of at
   most one token, exactly as the official code does before it pastes the image on a padded canvas;
   we never build that canvas. The short side is at least one token, so a 1 x 10000 image becomes
   one token row. With `resize_mode="area"` (EVEv2's rule) the scale makes sqrt(H*W) equal to
   `max_image_size` instead, and each side is rounded up to the multiple.
3. cut into p x p patches in window-major order (DEVELOPERS.md) while still uint8, then normalise
   with `image_mean` / `image_std` in one pass over the packed patches.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import BinaryIO, TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_processing_base import BatchFeature, ImageProcessingMixin

from eve.configuration_eve import CLIP_MEAN, CLIP_STD
from eve.patch_embedding import patchify

logger = logging.getLogger(__name__)

# File suffixes (lower case) read as images everywhere: folder scans, webdataset members, benchmarks.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

ImageInput = Image.Image | str | os.PathLike | np.ndarray

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


# Largest source image accepted, in pixels (width x height, before any resize). The model resizes
# every image to max_image_size, but the source is decoded first: a 12,000 x 12,000 photo costs
# seconds and ~430 MB as RGB. Pillow's own bomb limit (~89 Mpx warns, ~179 Mpx fails) is higher.
MAX_PIXELS = 50_000_000


class ImageLoadError(ValueError):
    """An image cannot be used: missing, unreadable, truncated, empty or of an unknown mode (names the file)."""


class ImageNotFoundError(ImageLoadError):
    """The image file does not exist."""


class ImageTooLargeError(ImageLoadError):
    """The source image has more pixels than allowed (refused from its header, before decoding)."""


def _describe(image: ImageInput, index: int | None = None) -> str:
    """A name for error messages: the file path if known, else the image's position."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    filename = getattr(image, "filename", None)
    if filename:
        return str(filename)
    return f"<in-memory image {index}>" if index is not None else "<in-memory image>"


def to_rgb(image: Image.Image, name: str = "<in-memory image>") -> Image.Image:
    """`image` upright (EXIF) in 8-bit RGB; transparency composited on white, 16-bit scaled to 8-bit."""
    if image.width < 1 or image.height < 1:
        raise ImageLoadError(
            f"Image {name} is empty ({image.width}x{image.height} px); drop it from the data."
        )
    if image.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        values = np.asarray(image).astype(np.float32)  # (H, W)
        if mode == "F":
            values = values * 255.0 if values.size and values.max() <= 1.0 else values
        else:
            values = values / 257.0  # 65535 -> 255 exactly
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageLoadError(
            f"Image {name} has mode {mode!r} that cannot be converted to RGB: {err}"
        ) from err


def open_image(
    fp: str | os.PathLike | BinaryIO, name: str | None = None, max_pixels: int | None = MAX_PIXELS
) -> Image.Image:
    """Open an image file (path or binary file object) and decode it fully, as stored (no mode change).

    The size in the header is checked against `max_pixels` (None: no limit) before any pixel is
    decoded. Errors are ImageLoadError subclasses naming `name` (default: the path).
    """
    name = name or _describe(fp)
    try:
        image = Image.open(fp)
    except FileNotFoundError as err:
        raise ImageNotFoundError(
            f"Image file {name} does not exist; check the path and the image folder."
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(
            f"Image {name} is larger than Pillow's decompression-bomb limit ({err}); downscale the file "
            "or drop the sample."
        ) from err
    except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(
            f"Cannot read image {name} ({type(err).__name__}: {err}); the file is corrupt or not an image: "
            "replace it or drop the sample."
        ) from err
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(
            f"Image {name} is {width} x {height} = {width * height:,} pixels, more than max_pixels "
            f"{max_pixels:,}; it is refused before decoding (decoding costs ~{3 * width * height / 2**20:,.0f} "
            "MB and seconds for an image the model shrinks anyway): downscale the file, drop the sample, "
            "or raise the limit (data.max_pixels)."
        )
    try:
        image.load()  # decode now: corrupt or truncated files fail here, not later in the model
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        image.close()
        raise ImageLoadError(
            f"Cannot read image {name} ({type(err).__name__}: {err}); the file is corrupt, truncated or "
            "not an image: replace it or drop the sample."
        ) from err
    return image


def load_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Read an image file fully (so truncation shows here) and return it upright in RGB; ImageLoadError names it.

    Sources over `max_pixels` pixels (None: no limit) are refused before decoding (ImageTooLargeError).
    """
    name = os.fspath(path)
    with open_image(name, name, max_pixels) as image:  # the exit closes the file, not the pixels
        return to_rgb(image, name)


def as_rgb_image(
    image: ImageInput, index: int | None = None, max_pixels: int | None = MAX_PIXELS
) -> Image.Image:
    """Any accepted image input (path, PIL image, uint8 array HxW / HxWx3 / HxWx4) as an upright RGB image.

    `max_pixels` applies to paths (read here); images already in memory are taken as they are.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels)
    if isinstance(image, np.ndarray):
        if (
            image.dtype != np.uint8
            or image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] not in (3, 4))
        ):
            raise ImageLoadError(
                f"{_describe(image, index)}: arrays must be uint8 HxW, HxWx3 or HxWx4, "
                f"got {image.dtype} {image.shape}."
            )
        if image.size == 0:
            raise ImageLoadError(
                f"{_describe(image, index)} is empty ({image.shape}); drop it from the data."
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a path, PIL image or uint8 array, got {type(image).__name__}.")
    return to_rgb(image, _describe(image, index))


def _ceil_to_multiple(length_num: int, length_den: int, multiple: int) -> int:
    """ceil(length_num / length_den / multiple) * multiple in exact integer arithmetic, at least `multiple`."""
    units = -(-length_num // (length_den * multiple))
    return max(1, units) * multiple


def fit_area(height: int, width: int, side: int, multiple: int) -> tuple[int, int]:
    """(H, W) px with sqrt(H*W) == side before each side is rounded up to `multiple` (EVEv2's rule)."""
    if height < 1 or width < 1:
        raise ImageLoadError(f"Cannot resize an empty image ({height}x{width} px).")
    scale = math.sqrt(width * height) / side  # the official float arithmetic, rounded up per side
    return tuple(max(math.ceil(n / scale / multiple), 1) * multiple for n in (height, width))


def fit_long_side(height: int, width: int, long_side: int, multiple: int) -> tuple[int, int]:
    """(H, W) px with the long side == long_side and the short side rounded up to `multiple` (the official rule)."""
    if height < 1 or width < 1:
        raise ImageLoadError(f"Cannot resize an empty image ({height}x{width} px).")
    if width > height:  # the official code tests width > height: a square image takes the else branch
        return _ceil_to_multiple(long_side * height, width, multiple), long_side
    return long_side, _ceil_to_multiple(long_side * width, height, multiple)


class EveImageProcessorKwargs(TypedDict, total=False):
    """Settings accepted by EveImageProcessor (saved in preprocessor_config.json)."""

    patch_size: int
    conv_stride: int
    max_image_size: int
    resize_multiple: int | None
    resize_mode: str
    image_mean: list[float]
    image_std: list[float]
    resample: str


class EveImageProcessor(ImageProcessingMixin):
    """Images of any size and mode -> {"pixel_values": (P_total, 3*p*p), "image_grid_hw": (n, 2)}."""

    model_input_names = ["pixel_values", "image_grid_hw"]
    valid_kwargs = EveImageProcessorKwargs

    def __init__(
        self,
        patch_size: int = 14,
        conv_stride: int = 2,
        max_image_size: int = 672,
        resize_multiple: int | None = None,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        resample: str = "bicubic",
        resize_mode: str = "long_side",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.conv_stride = int(conv_stride)
        self.max_image_size = int(max_image_size)
        # Short-side rounding unit in px. p*s by default; EVE-7B-HD's official code rounds to 56 px
        # (2 tokens) so that the student grid pools evenly onto the 336-px teacher grid.
        self.resize_multiple = int(resize_multiple) if resize_multiple else None
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.resample = resample
        # "long_side": the long side becomes max_image_size (EVE); "area": sqrt(H*W) does (EVEv2).
        self.resize_mode = resize_mode
        if resize_mode not in ("long_side", "area"):
            raise ValueError(f"resize_mode must be 'long_side' or 'area', got {resize_mode!r}.")
        token_px = self.patch_size * self.conv_stride
        if self.max_image_size % token_px or self.multiple % token_px:
            raise ValueError(
                f"max_image_size ({self.max_image_size}) and resize_multiple ({self.multiple}) must be "
                f"multiples of patch_size*conv_stride ({token_px})."
            )
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}.")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (RGB).")

    @classmethod
    def from_config(cls, config, **overrides) -> EveImageProcessor:
        """The processor matching an EveConfig (patch, stride, long side, mean/std), fields overridable."""
        kwargs = dict(
            patch_size=config.vision_patch_size,
            conv_stride=config.vision_conv_stride,
            max_image_size=config.max_image_size,
            resize_multiple=config.image_resize_multiple,
            image_mean=list(config.image_mean),
            image_std=list(config.image_std),
            resize_mode=config.image_resize_mode,
        )
        return cls(**{**kwargs, **overrides})

    @property
    def multiple(self) -> int:
        """Short-side rounding unit in px (resize_multiple, default patch_size * conv_stride)."""
        return self.resize_multiple or self.patch_size * self.conv_stride

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) px that an image of height x width px is resized to."""
        fit = fit_area if self.resize_mode == "area" else fit_long_side
        return fit(height, width, self.max_image_size, self.multiple)

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) LLM token grid of an image of height x width px (known without reading pixels)."""
        token_px = self.patch_size * self.conv_stride
        big_h, big_w = self.target_size(height, width)
        return big_h // token_px, big_w // token_px

    @staticmethod
    def num_image_tokens(h: int, w: int) -> int:
        """LLM positions of an (h, w) grid: [CLS] + h rows of (w + [SPL]); equals EveConfig.num_image_tokens."""
        return 1 + h * (w + 1)

    def _normaliser(self, repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) with x_uint8 * scale - shift == (x / 255 - mean) / std, each channel repeated `repeat` times."""
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        scale = (1.0 / (255.0 * std)).repeat_interleave(repeat)
        shift = (mean / std).repeat_interleave(repeat)
        return scale, shift

    def _resized_uint8(self, image: Image.Image, size_hw: tuple[int, int]) -> torch.Tensor:
        """Resize an RGB image to (H, W) and return it as a (3, H, W) uint8 tensor (no float copy yet)."""
        height, width = size_hw
        if image.size != (width, height):
            image = image.resize((width, height), RESAMPLE[self.resample])
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8 (a writable copy)

    def preprocess(self, images: ImageInput | Sequence[ImageInput], **kwargs) -> BatchFeature:
        """Images -> packed normalised patches (P_total, 3*p*p) float32 and their grids (n, 2) long."""
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}; set them on the processor instead.")
        if not isinstance(images, (list, tuple)):
            images = [images]
        p, s = self.patch_size, self.conv_stride
        patches, grids = [], []
        for index, image in enumerate(images):
            rgb = as_rgb_image(image, index)
            big_h, big_w = self.target_size(rgb.height, rgb.width)
            pixels = self._resized_uint8(rgb, (big_h, big_w))  # (3, H, W) uint8
            patches.append(patchify(pixels, p, s))  # (h*w*s*s, 3*p*p) uint8
            grids.append((big_h // (p * s), big_w // (p * s)))
        if patches:
            packed = torch.cat(patches) if len(patches) > 1 else patches[0]
        else:
            packed = torch.empty(0, 3 * p * p, dtype=torch.uint8)
        scale, shift = self._normaliser(p * p)
        pixel_values = packed.to(torch.float32).mul_(scale).sub_(shift)  # (P_total, 3*p*p)
        image_grid_hw = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)
        return BatchFeature({"pixel_values": pixel_values, "image_grid_hw": image_grid_hw})

    __call__ = preprocess
