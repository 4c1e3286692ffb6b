"""ControlNet 1.1 inpaint's control image: the upload with its transparent pixels masked (-1 for the model)."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.detectors.inpaint import NEEDS_MASK, InpaintDetector, request_mask, upload_mask
from models.image import InputImageError
from models.pipeline import control_image
from tests.conftest import drawing


def holed(path, width=400, height=300, box=(100, 60, 260, 200)):
    rgba = np.asarray(drawing(width, height, "RGBA")).copy()
    left, top, right, bottom = box
    rgba[top:bottom, left:right, 3] = 0
    Image.fromarray(rgba).save(path)
    return path


def test_the_mask_is_the_uploads_transparent_pixels(tmp_path):
    mask = upload_mask(holed(tmp_path / "a.png"))
    assert mask.shape == (300, 400) and mask.dtype == bool
    assert mask[60:200, 100:260].all() and mask.sum() == 140 * 160


def test_an_opaque_or_unreadable_upload_has_no_mask(tmp_path):
    drawing().save(tmp_path / "rgb.png")
    drawing(mode="RGBA").save(tmp_path / "opaque.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert all(upload_mask(tmp_path / name) is None for name in ("rgb.png", "opaque.png", "junk.png"))


def test_the_mask_is_cropped_as_the_request_crops_the_image(tmp_path):
    path = holed(tmp_path / "a.png", box=(0, 0, 60, 300))  # a strip on the left of a 4:3 upload
    assert request_mask(path, "512").shape == (300, 400)
    square = request_mask(path, "512", width=512, height=512)  # centre crop to 300x300 from x = 50
    assert square.shape == (300, 300) and square[:, :10].all() and not square[:, 10:].any()
    assert request_mask(holed(tmp_path / "b.png", box=(0, 0, 50, 300)), "512", width=512, height=512) is None


def test_map_is_rgba_with_the_masked_pixels_transparent():
    image = np.asarray(drawing(320, 256))
    mask = np.zeros((300, 400), bool)
    mask[60:200, 100:260] = True
    control = InpaintDetector()(image, mask=mask)
    assert control.shape == (256, 320, 4) and control.dtype == np.uint8
    np.testing.assert_array_equal(control[..., :3], image)
    assert set(np.unique(control[..., 3])) == {0, 255}
    # The mask is scaled to the image (0.8x here): its centre is masked, the corners are not.
    assert control[110, 145, 3] == 0 and control[0, 0, 3] == 255 and control[-1, -1, 3] == 255


def test_the_model_sees_minus_one_where_masked_and_the_image_elsewhere():
    image = np.asarray(drawing(128, 64))
    mask = np.zeros((64, 128), bool)
    mask[:, :64] = True
    control = control_image(InpaintDetector()(image, mask=mask))
    assert isinstance(control, torch.Tensor) and control.shape == (1, 3, 64, 128)
    assert (control[..., :20] == -1).all()
    np.testing.assert_allclose(control[0, :, :, 100:].permute(1, 2, 0).numpy(), image[:, 100:] / 255.0, atol=1e-6)
    assert isinstance(control_image(image), Image.Image)  # every other map: unchanged


def test_without_a_mask_it_says_what_it_needs():
    with pytest.raises(InputImageError, match="transparent pixels"):
        InpaintDetector()(np.asarray(drawing(64, 64)), mask=None)
    assert "transparent" in NEEDS_MASK


def test_a_speck_blurred_away_is_refused():
    mask = np.zeros((256, 256), bool)
    mask[100, 100] = True
    with pytest.raises(InputImageError, match="too small"):
        InpaintDetector()(np.asarray(drawing(256, 256)), mask=mask)


def test_an_uploaded_map_cannot_carry_the_mask():
    assert "transparent" in InpaintDetector.map_problem(np.zeros((64, 64, 3), np.uint8))
