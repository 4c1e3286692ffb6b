import numpy as np
import pytest
from PIL import Image

from models.image import InputImageError, load_rgb, resize_map, resize_to_resolution, target_size


@pytest.mark.parametrize(
    "height, width, resolution, expected",
    [
        (512, 512, 512, (512, 512)),
        (300, 400, 256, (256, 320)),  # 341.3 rounds to 320
        (400, 300, 512, (704, 512)),  # 682.7 rounds to 704
        (1080, 1920, 768, (768, 1344)),  # 1365.3 rounds to 1344
        (100, 100, 768, (768, 768)),  # small inputs are enlarged
    ],
)
def test_target_size_keeps_aspect_on_multiples_of_64(height, width, resolution, expected):
    assert target_size(height, width, resolution) == expected
    out_h, out_w = expected
    assert out_h % 64 == 0 and out_w % 64 == 0
    assert min(out_h, out_w) == resolution


def test_resize_to_resolution_returns_that_size():
    image = np.zeros((300, 400, 3), np.uint8)
    assert resize_to_resolution(image, 256).shape == (256, 320, 3)


def test_extreme_aspect_ratio_is_refused_with_a_fix():
    with pytest.raises(InputImageError, match="crop it to at most 4:1"):
        target_size(100, 1000, 512)


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:32, :, :] = (10, 20, 30, 255)  # opaque top half, transparent bottom half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = load_rgb(tmp_path / "a.png")
    assert rgb.shape == (64, 64, 3)
    assert (rgb[:32] == (10, 20, 30)).all()
    assert (rgb[32:] == 255).all()


def test_greyscale_becomes_three_equal_channels(tmp_path):
    grey = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    rgb = load_rgb(tmp_path / "g.png")
    assert rgb.shape == (64, 64, 3)
    assert (rgb[..., 0] == grey).all() and (rgb[..., 1] == grey).all() and (rgb[..., 2] == grey).all()


def test_undecodable_file_says_what_to_send(tmp_path):
    (tmp_path / "x.png").write_bytes(b"definitely not an image")
    with pytest.raises(InputImageError, match="not an image format this server reads; send a PNG, JPEG, WebP"):
        load_rgb(tmp_path / "x.png")


def test_resize_map_nearest_keeps_only_existing_values():
    rng = np.random.default_rng(1)
    palette = np.array([[0, 0, 0], [120, 120, 120], [250, 10, 90]], np.uint8)
    labels = palette[rng.integers(0, 3, size=(64, 64))]
    resized = resize_map(labels, 100, 150, "nearest")
    assert resized.shape == (100, 150, 3)
    assert {tuple(c) for c in resized.reshape(-1, 3)} <= {tuple(c) for c in palette}


def test_exif_orientation_is_applied(tmp_path):
    landscape = Image.new("RGB", (120, 60), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    landscape.save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").shape == (120, 60, 3)
