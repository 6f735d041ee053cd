"""EveImageProcessor against hand-computed sizes, an explicit-loop patch reference and known pixels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eve.assets import skimage_photo
from eve.image_processing_eve import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_PIXELS,
    EveImageProcessor,
    ImageLoadError,
    ImageTooLargeError,
    load_image,
)

# Float32 normalisation: x * (1/(255 std)) - mean/std vs (x/255 - mean)/std differ by a few ulps of ~2.
ATOL = 1e-5


def full():
    """EVE-7B settings: p=14, s=2, long side 672 (24 tokens)."""
    return EveImageProcessor(patch_size=14, conv_stride=2, max_image_size=672)


def tiny():
    """The tiny test settings: p=4, s=2, long side 32."""
    return EveImageProcessor(patch_size=4, conv_stride=2, max_image_size=32)


def normalised(image: Image.Image, size_hw, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Independent reference: PIL bicubic resize, then (x / 255 - mean) / std as (3, H, W)."""
    resized = image.convert("RGB").resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    x = torch.tensor(np.array(resized), dtype=torch.float32).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize(
    "width, height, grid, n_tokens",
    [
        # 100 wide x 37 high: short side 672*37/100 = 248.6 px -> rounded up to 9 * 28 = 252 px.
        (100, 37, (9, 24), 1 + 9 * 25),
        (37, 100, (24, 9), 1 + 24 * 10),
        (672, 672, (24, 24), 601),
        (1, 10000, (24, 1), 1 + 24 * 2),  # extreme aspect: one token column, not an error
        (10000, 1, (1, 24), 1 + 1 * 25),
        (20, 20, (24, 24), 601),  # small images are up-scaled
    ],
)
def test_grid_and_token_count_for_odd_sizes(width, height, grid, n_tokens):
    from eve import EveConfig

    ip = full()
    assert ip.grid_hw(height, width) == grid
    assert ip.num_image_tokens(*grid) == n_tokens == EveConfig().num_image_tokens(*grid)
    out = ip(Image.new("RGB", (width, height), (10, 200, 30)))
    assert out["image_grid_hw"].tolist() == [list(grid)]
    assert out["pixel_values"].shape == (grid[0] * grid[1] * 4, 3 * 14 * 14)
    assert out["pixel_values"].dtype == torch.float32


def test_tiny_config_sizes():
    ip = tiny()
    # 100 x 37 -> long side 32, short side 32*37/100 = 11.84 px -> 2 tokens of 8 px = 16 px.
    assert ip.target_size(37, 100) == (16, 32)
    assert ip.grid_hw(37, 100) == (2, 4)
    assert ip.num_image_tokens(2, 4) == 11


def test_patch_order_matches_an_explicit_loop():
    """Window-major order: s x s windows in raster order, patches in raster order inside, (3, p, p) flat."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (27, 40, 3), dtype=np.uint8))
    ip, p, s = tiny(), 4, 2
    out = ip(image)
    h, w = out["image_grid_hw"][0].tolist()
    ref = normalised(image, (h * p * s, w * p * s))
    expected = [
        ref[:, (r * s + i) * p : (r * s + i + 1) * p, (c * s + j) * p : (c * s + j + 1) * p].reshape(-1)
        for r in range(h)
        for c in range(w)
        for i in range(s)
        for j in range(s)
    ]
    torch.testing.assert_close(out["pixel_values"], torch.stack(expected), atol=ATOL, rtol=0)


def test_real_photo_at_full_size_matches_unfold_reference():
    """A real scikit-image photo (600x400 coffee) at EVE-7B settings vs F.unfold re-ordered to window-major."""
    image = Image.open(skimage_photo("coffee.png"))
    ip, p, s = full(), 14, 2
    out = ip(skimage_photo("coffee.png"))
    assert out["image_grid_hw"].tolist() == [[16, 24]]  # 400/600*672 = 448 px = 16 tokens exactly
    ref = normalised(image, (448, 672))
    cols = F.unfold(ref[None], kernel_size=p, stride=p)[0].T  # (32*48, 3*p*p), raster over the patch grid
    cols = cols.view(16, s, 24, s, -1).permute(0, 2, 1, 3, 4).reshape(-1, 3 * p * p)
    torch.testing.assert_close(out["pixel_values"], cols, atol=ATOL, rtol=0)


def test_batch_equals_images_one_by_one():
    ip = tiny()
    images = [skimage_photo("astronaut.png"), skimage_photo("camera.png"), Image.new("L", (5, 50), 77)]
    batch = ip(images)
    alone = [ip(im) for im in images]
    torch.testing.assert_close(batch["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    assert batch["image_grid_hw"].tolist() == [a["image_grid_hw"][0].tolist() for a in alone]


def _png(tmp_path, image: Image.Image, name: str, **kw) -> str:
    path = str(tmp_path / name)
    image.save(path, **kw)
    return path


def test_every_mode_gives_the_expected_rgb(tmp_path):
    size = (6, 4)
    palette = Image.new("P", size, 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1
    cases = {
        # mode: (saved file, expected RGB at pixel (2, 1))
        "L": (_png(tmp_path, Image.new("L", size, 100), "l.png"), (100, 100, 100)),
        "LA opaque": (_png(tmp_path, Image.new("LA", size, (100, 255)), "la.png"), (100, 100, 100)),
        "LA transparent": (_png(tmp_path, Image.new("LA", size, (100, 0)), "la0.png"), (255, 255, 255)),
        # 50% alpha over white: 200 * 128/255 + 255 * 127/255 = 227.4
        "RGBA half": (
            _png(tmp_path, Image.new("RGBA", size, (200, 10, 20, 128)), "rgba.png"),
            (227, 132, 137),
        ),
        "RGBA transparent": (
            _png(tmp_path, Image.new("RGBA", size, (200, 10, 20, 0)), "rgba0.png"),
            (255, 255, 255),
        ),
        "P": (_png(tmp_path, palette, "p.png"), (10, 20, 30)),
        "P transparent": (_png(tmp_path, transparent_palette, "pt.png", transparency=1), (255, 255, 255)),
        # Pillow's CMYK -> RGB: R = 255 - C - K ... (no colour profile): C=0, M=255, Y=0, K=0 -> magenta.
        "CMYK": (_png(tmp_path, Image.new("CMYK", size, (0, 255, 0, 0)), "cmyk.tif"), (255, 0, 255)),
        "I;16": (
            _png(tmp_path, Image.fromarray(np.full((4, 6), 257 * 100, dtype=np.uint16)), "i16.png"),
            (100, 100, 100),
        ),
        "1": (_png(tmp_path, Image.new("1", size, 1), "bit.png"), (255, 255, 255)),
    }
    for name, (path, rgb) in cases.items():
        image = load_image(path)
        assert image.mode == "RGB", name
        got = image.getpixel((2, 1))
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= 1, (name, got, rgb)  # 1: alpha rounding
    # 32-bit "I" holding 16-bit data and the 16-bit maximum.
    assert load_image(_png(tmp_path, Image.new("I", size, 65535), "i32.tif")).getpixel((0, 0)) == (
        255,
        255,
        255,
    )


def test_exif_rotation_is_applied(tmp_path):
    """Stored 40x20, left red / right blue, orientation 6 (rotate 90 CW): shown 20x40, red on top."""
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / "rotated.jpg")
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # JPEG error is a few levels


def test_greyscale_real_photo_becomes_equal_channels():
    image = load_image(skimage_photo("camera.png"))
    r, g, b = image.split()
    assert image.mode == "RGB" and r.tobytes() == g.tobytes() == b.tobytes()


def test_unreadable_files_name_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all" * 10)
    for path in (truncated, garbage, tmp_path / "missing.jpg"):
        with pytest.raises(ImageLoadError, match=path.name):
            load_image(path)
        with pytest.raises(ImageLoadError, match=path.name):
            tiny()([str(path)])
    with pytest.raises(ImageLoadError, match="empty"):
        tiny()(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageLoadError, match="empty"):
        tiny()(np.zeros((0, 4, 3), dtype=np.uint8))


def test_oversized_source_is_refused_by_name_before_decoding(tmp_path, monkeypatch):
    """An 8,000 x 8,000 PNG (64 Mpx, a few KB on disk) over max_pixels 10 Mpx: an ImageLoadError naming
    the file and both sizes, raised from the header alone (decoding it would fail the guard)."""
    from PIL import ImageFile

    path = tmp_path / "huge.png"
    Image.new("L", (8000, 8000), 77).save(path, compress_level=1)
    real_load = ImageFile.ImageFile.load

    def guarded_load(self):
        assert self.size[0] * self.size[1] <= 10_000_000, "an oversized image was decoded"
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)
    with pytest.raises(ImageTooLargeError, match=r"huge\.png.*8000 x 8000.*64,000,000.*10,000,000") as err:
        load_image(path, max_pixels=10_000_000)
    assert isinstance(err.value, ImageLoadError)
    small = tmp_path / "small.png"
    Image.new("RGB", (4000, 2500), (1, 2, 3)).save(small, compress_level=1)  # exactly 10 Mpx: allowed
    assert load_image(small, max_pixels=10_000_000).size == (4000, 2500)
    assert MAX_PIXELS == 50_000_000


def test_save_and_load_round_trip(tmp_path):
    from eve import EveConfig

    ip = EveImageProcessor.from_config(EveConfig.from_preset("eve-7b-hd"), resize_multiple=56)
    ip.save_pretrained(tmp_path)
    back = EveImageProcessor.from_pretrained(tmp_path)
    assert (back.patch_size, back.conv_stride, back.max_image_size, back.multiple) == (14, 2, 1344, 56)
    assert back.image_mean == pytest.approx(CLIP_MEAN) and back.image_std == pytest.approx(CLIP_STD)
    assert back.grid_hw(37, 100) == ip.grid_hw(37, 100) == (18, 48)  # 1344*37/100 = 497 px -> 9 * 56 = 504


def test_hd_preset_rounds_short_side_to_56_px():
    """EVE-7B-HD: 1344 x 700 px -> short side 700 * 1344 / 1344 = 700 -> 728 (13 x 56), grid (26, 48)."""
    from eve import EveConfig

    processor = EveImageProcessor.from_config(EveConfig.from_preset("eve-7b-hd"))
    assert processor.target_size(700, 1344) == (728, 1344)
    assert processor.grid_hw(700, 1344) == (26, 48)
    # EVE-7B keeps p*s = 28 px: 336 x 672 -> 350 px is not a multiple of 28, so 364 (13 x 28).
    processor = EveImageProcessor.from_config(EveConfig.from_preset("eve-7b"))
    assert processor.target_size(350, 672) == (364, 672)
