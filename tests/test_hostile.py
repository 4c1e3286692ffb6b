"""Hostile and unusual uploads through the shared path, against canny and a network-based condition (hed):
each is either handled correctly or refused with a message that says what to send, and the predictor
keeps serving afterwards. (URL fetching and HTTP-level abuse are tested against the server itself.)"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import drawing, predictor_class

FAST = dict(ddim_steps=1, image_resolution="256", seed=5)
CONDITIONS = ["canny", "hed"]


@pytest.fixture(scope="module", params=CONDITIONS)
def predictor(request):
    p = predictor_class(request.param)()
    p.setup()
    return p


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares a size its (absent) data never fills: a decompression bomb's calling card."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def sixteen_bit() -> Image.Image:
    ramp = np.tile(np.linspace(0, 65535, 400, dtype=np.uint16), (300, 1))
    return Image.fromarray(ramp)  # mode I;16


def animated_gif() -> bytes:
    frames = [drawing().convert("P"), Image.new("P", (400, 300), 0)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def palette_with_transparency() -> bytes:
    img = drawing().convert("P")
    return encoded(img, "PNG", transparency=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(drawing(400, 300), "JPEG", exif=exif)


REFUSED = {
    "empty file": (b"", "is empty"),
    "random bytes": (np.random.default_rng(0).bytes(5000), "not an image format"),
    "text": (b"hello, this is a note", "not an image format"),
    "SVG drawing": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
    "HTML page": (b"<!DOCTYPE html><html><body>404</body></html>", "HTML page"),
    "truncated PNG": (encoded(drawing(), "PNG")[:3000], "truncated"),
    "truncated JPEG": (encoded(drawing(), "JPEG")[:1500], "truncated"),
    "decompression bomb (40000x40000 PNG header)": (png_header_only(40000, 40000), "MP"),
    "extreme aspect 2000x100": (encoded(Image.new("RGB", (2000, 100), "white"), "PNG"), "crop it to at most 4:1"),
}

ACCEPTED = {
    "RGB PNG": (lambda: encoded(drawing(), "PNG"), (320, 256)),
    "JPEG": (lambda: encoded(drawing(), "JPEG"), (320, 256)),
    "WebP": (lambda: encoded(drawing(), "WEBP"), (320, 256)),
    "BMP": (lambda: encoded(drawing(), "BMP"), (320, 256)),
    "TIFF": (lambda: encoded(drawing(), "TIFF"), (320, 256)),
    "greyscale": (lambda: encoded(drawing(mode="L"), "PNG"), (320, 256)),
    "1-bit": (lambda: encoded(drawing(mode="1"), "PNG"), (320, 256)),
    "palette with transparency": (palette_with_transparency, (320, 256)),
    "RGBA": (lambda: encoded(drawing(mode="RGBA"), "PNG"), (320, 256)),
    "greyscale + alpha": (lambda: encoded(drawing(mode="LA"), "PNG"), (320, 256)),
    "16-bit greyscale": (lambda: encoded(sixteen_bit(), "PNG"), (320, 256)),
    "CMYK JPEG": (lambda: encoded(drawing(mode="CMYK"), "JPEG"), (320, 256)),
    "animated GIF": (animated_gif, (320, 256)),
    "EXIF-rotated JPEG": (exif_rotated, (256, 320)),
    "tiny 1x1": (lambda: encoded(Image.new("RGB", (1, 1), "red"), "PNG"), (256, 256)),
    "tiny 7x5": (lambda: encoded(Image.new("RGB", (7, 5), "red"), "PNG"), (384, 256)),
    "large 6000x4000": (lambda: encoded(Image.new("RGB", (6000, 4000), "white"), "JPEG"), (384, 256)),
    "aspect 4:1": (lambda: encoded(Image.new("RGB", (1600, 400), "white"), "PNG"), (1024, 256)),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_uploads_are_refused_with_what_to_send(predictor, tmp_path, name):
    raw, message = REFUSED[name]
    path = tmp_path / "upload"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as error:
        predictor.generate(path, "x", **FAST)
    assert str(tmp_path) not in str(error.value)  # never the server's paths
    drawing().save(tmp_path / "ok.png")  # and the next request is served as usual
    assert len(predictor.generate(tmp_path / "ok.png", "x", **FAST)) == 2


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_every_common_format_and_mode_is_accepted(predictor, tmp_path, name):
    make, size = ACCEPTED[name]
    path = tmp_path / "upload"
    path.write_bytes(make())
    files = predictor.generate(path, "x", **FAST)
    assert [Image.open(f).size for f in files] == [size, size]
    assert all(np.asarray(Image.open(f)).shape[2] == 3 for f in files)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    from models.image import load_rgb

    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "mid.png")
    assert abs(int(load_rgb(tmp_path / "mid.png")[0, 0, 0]) - 128) <= 1  # clipping would give 255


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_sixteen_bit_and_float_images_convert_exactly_in_bounded_memory(tmp_path, mode):
    """The 8-bit conversion works in bands of rows: the same pixels as converting the whole image in
    float64 (which took 1.8 GB for a 64 MP 16-bit PNG), with numpy's peak near the RGB result's size."""
    import tracemalloc

    from models.image import load_rgb

    height, width = 2000, 2500  # 5 MP: several bands
    rng = np.random.default_rng(1)
    if mode == "I;16":
        pixels = rng.integers(0, 65536, (height, width), dtype=np.uint16)
    elif mode == "I":
        pixels = rng.integers(-100, 300_000, (height, width), dtype=np.int32)
    else:
        pixels = rng.random((height, width), dtype=np.float32)
    Image.fromarray(pixels).save(tmp_path / "in.tif")
    values = np.asarray(Image.open(tmp_path / "in.tif"), dtype=np.float64)
    high = values.max()
    scaled = values / 257.0 if mode == "I;16" else values * (255.0 / high) if mode == "I" else values * 255.0
    expected = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    del values, scaled

    tracemalloc.start()
    try:
        rgb = load_rgb(tmp_path / "in.tif")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)
    np.testing.assert_array_equal(rgb[:, :, 0], expected)
    np.testing.assert_array_equal(rgb[:, :, 2], expected)
    assert peak < 2 * rgb.nbytes  # converted whole in float64 it was ~8 times the RGB result


def test_malformed_metadata_is_one_note_without_server_paths(tmp_path, capfd):
    import warnings

    from models.image import load_rgb

    # An IFD that claims five entries and holds one (orientation 1): Pillow warns "Corrupt EXIF data".
    exif = b"MM\x00\x2a\x00\x00\x00\x08\x00\x05" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x01\x00\x00"
    drawing().save(tmp_path / "exif.png", exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping load_rgb would fail here
        assert load_rgb(tmp_path / "exif.png").shape == (300, 400, 3)
    out, err = capfd.readouterr()
    assert "Note: the image's metadata is malformed and was ignored (Corrupt EXIF data" in out
    assert ".py" not in out + err and "site-packages" not in out + err


def test_overlong_prompt_is_truncated_with_one_warning(predictor, image_file, capsys):
    files = predictor.generate(image_file(), "a house " * 200, **FAST)
    assert len(files) == 2
    out = capsys.readouterr().out
    assert out.count("WARNING: the prompt is") == 1 and "are ignored" in out


def test_empty_prompt_is_refused(predictor, image_file):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        predictor.generate(image_file(), "   ", **FAST)


def test_non_finite_output_is_reported_not_returned_black(image_file):
    import torch

    p = predictor_class("canny")()
    p.setup()
    with torch.no_grad():
        p.runner.pipe.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite values"):
        p.generate(image_file(), "x", **FAST)
