"""The ControlNet 1.1 images through the plain method, on tiny weights (no HTTP)."""

import functools

import cv2
import numpy as np
import pytest
from PIL import Image

from models.image import resize_to
from models.pipeline import Request
from tests.conftest import drawing, random_lora, set_up

FAST = dict(ddim_steps=1, image_resolution="256", seed=3)
predictor = functools.cache(set_up)


def outputs(files):
    return [np.asarray(Image.open(f)) for f in files]


def save(array, path):
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("condition, option, choices", [
    ("lineart", "lineart_preprocessor", ["realistic", "coarse"]),
    ("softedge", "softedge_preprocessor", ["pidinet", "pidinet_safe", "hed", "hed_safe"]),
])
def test_each_preprocessor_choice_reaches_the_detector(condition, option, choices, tmp_path):
    path = save(np.asarray(drawing(256, 256)), tmp_path / "in.png")
    maps = [outputs(predictor(condition).generate(path, "x", preprocess_only=True, detect_resolution=128,
                                                  **FAST, **{option: choice}))[0] for choice in choices]
    assert all(m.shape == (256, 256, 3) for m in maps)
    assert len({m.tobytes() for m in maps}) == len(choices)


@pytest.mark.parametrize("condition", ["lineart", "softedge"])
def test_an_uploaded_line_map_is_checked_then_used_as_is(condition, tmp_path):
    p = predictor(condition)
    with pytest.raises(ValueError, match=f"control_image_is_map is on, but .*Send a {condition} map"):
        p.generate(save(np.asarray(drawing(256, 256)), tmp_path / "photo.png"), "x", control_image_is_map=True, **FAST)
    lines = np.zeros((256, 256, 3), np.uint8)
    cv2.line(lines, (10, 10), (240, 200), (200, 200, 200), 3)
    control = outputs(p.generate(save(lines, tmp_path / "map.png"), "x", control_image_is_map=True,
                                 preprocess_only=True, **FAST))[0]
    np.testing.assert_array_equal(control, lines)


@pytest.mark.parametrize("condition", ["lineart", "softedge", "shuffle", "tile", "ip2p"])
def test_an_uploaded_map_of_an_unusable_shape_or_file_is_refused(condition, tmp_path):
    wide = np.zeros((64, 320, 3), np.uint8)
    cv2.line(wide, (0, 32), (319, 32), (255, 255, 255), 2)
    with pytest.raises(ValueError, match="aspect ratio 5.0:1 is too extreme; crop it"):
        predictor(condition).generate(save(wide, tmp_path / "wide.png"), "x", control_image_is_map=True, **FAST)
    (tmp_path / "map.png").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="image could not be decoded: the file is an HTML page"):
        predictor(condition).generate(tmp_path / "map.png", "x", control_image_is_map=True, **FAST)


@pytest.mark.parametrize("condition", ["lineart", "softedge"])
def test_a_dark_on_light_drawing_sent_as_a_line_map_is_refused_with_the_fix(condition, tmp_path):
    drawn = np.full((256, 256, 3), 255, np.uint8)
    cv2.line(drawn, (10, 10), (240, 200), (0, 0, 0), 3)
    with pytest.raises(ValueError, match="it is mostly light: .*invert a dark-on-light drawing"):
        predictor(condition).generate(save(drawn, tmp_path / "drawn.png"), "x", control_image_is_map=True, **FAST)


@pytest.mark.parametrize("condition", ["tile", "ip2p", "custom"])
def test_for_the_conditions_whose_map_is_the_upload_is_map_changes_nothing(condition, tmp_path):
    path = save(np.asarray(drawing(400, 300)), tmp_path / "in.png")  # resized down: area, not bilinear
    detected, uploaded = (outputs(predictor(condition).generate(path, "x", control_image_is_map=is_map, preprocess_only=True,
                                                                **FAST))[0] for is_map in (False, True))
    np.testing.assert_array_equal(uploaded, detected)


def test_a_picture_sent_as_a_shuffle_map_is_used_unshuffled(tmp_path):
    upload = np.asarray(drawing(400, 300))
    path = save(upload, tmp_path / "in.png")
    shuffled, as_map = (outputs(predictor("shuffle").generate(path, "x", control_image_is_map=is_map, preprocess_only=True,
                                                               **FAST))[0] for is_map in (False, True))
    np.testing.assert_array_equal(as_map, resize_to(upload, 256, 320))
    assert not np.array_equal(shuffled, as_map)


@pytest.mark.parametrize("condition", ["tile", "ip2p"])
def test_the_map_is_the_upload_at_the_sample_size(condition, tmp_path):
    upload = np.asarray(drawing(400, 300))
    control = outputs(predictor(condition).generate(save(upload, tmp_path / "in.png"), "make it winter",
                                                    preprocess_only=True, **FAST))[0]
    np.testing.assert_array_equal(control, resize_to(upload, 256, 320))


def test_shuffle_is_deterministic_and_runs_with_global_pooling(tmp_path):
    p = predictor("shuffle")
    path = save(np.asarray(drawing(400, 300)), tmp_path / "in.png")
    first, second = (outputs(p.generate(path, "a house", **FAST)) for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], resize_to(np.asarray(drawing(400, 300)), 256, 320))
    # The 1.1 shuffle model pools its conditioning (diffusers then runs it in guess mode), and so does
    # its tiny stand-in, so this path is the one served.
    assert p.runner.pipe.controlnet.config.global_pool_conditions is True
    other_seed = outputs(p.generate(path, "a house", **{**FAST, "seed": 4}))
    np.testing.assert_array_equal(other_seed[0], first[0])  # the map depends on the image alone
    assert not np.array_equal(other_seed[1], first[1])


def holed(path, box):
    rgba = np.asarray(drawing(400, 300, "RGBA")).copy()
    left, top, right, bottom = box
    rgba[top:bottom, left:right, 3] = 0
    return save(rgba, path)


def test_inpaint_masks_the_transparent_pixels_and_the_model_sees_them(tmp_path):
    p = predictor("inpaint")
    left = outputs(p.generate(holed(tmp_path / "l.png", (0, 0, 200, 300)), "a house", **FAST))
    right = outputs(p.generate(holed(tmp_path / "r.png", (200, 0, 400, 300)), "a house", **FAST))
    control = left[0]
    assert control.shape == (256, 320, 4)
    assert (control[:, :120, 3] == 0).all() and (control[:, 200:, 3] == 255).all()
    assert not np.array_equal(left[1], right[1])


def test_inpaint_masked_pixels_reach_the_controlnet_as_minus_one(tmp_path):
    p = predictor("inpaint")
    control = outputs(p.generate(holed(tmp_path / "in.png", (100, 60, 260, 200)), "x", preprocess_only=True, **FAST))[0]
    request = Request(prompt="a house", steps=1, seed=3)
    masked = np.asarray(p.runner.generate(control, request).samples[0])
    # The same pixels without the mask (the hole's white): a pipeline that dropped the alpha would
    # produce exactly this.
    unmasked = np.asarray(p.runner.generate(np.ascontiguousarray(control[..., :3]), request).samples[0])
    assert not np.array_equal(masked, unmasked)


def test_inpaint_says_what_it_needs(tmp_path):
    p = predictor("inpaint")
    with pytest.raises(ValueError, match="inpaint needs a mask: .*transparent pixels"):
        p.generate(save(np.asarray(drawing(400, 300)), tmp_path / "in.png"), "x", **FAST)
    with pytest.raises(ValueError, match="control_image_is_map is on, but an inpaint control image"):
        p.generate(holed(tmp_path / "h.png", (0, 0, 100, 100)), "x", control_image_is_map=True, **FAST)
    with pytest.raises(ValueError, match="could not be decoded"):  # the decoder's error, not the mask's
        (tmp_path / "junk.png").write_bytes(b"junk")
        p.generate(tmp_path / "junk.png", "x", **FAST)


def test_inpaint_mask_follows_the_exact_size_crop(tmp_path):
    # A strip on the upload's left edge; a square output centre-crops it away, so nothing is left to mask.
    path = holed(tmp_path / "in.png", (0, 0, 40, 300))
    with pytest.raises(ValueError, match="needs a mask"):
        predictor("inpaint").generate(path, "x", width=256, height=256, **FAST)
    control = outputs(predictor("inpaint").generate(path, "x", width=320, height=240, preprocess_only=True, **FAST))[0]
    assert (control[:, :16, 3] == 0).all() and (control[:, 64:, 3] == 255).all()


def tiny_lora(pipe) -> str:
    import torch
    from safetensors.torch import save as to_bytes

    from tests.conftest import data_uri

    state = random_lora(pipe.unet, "unet", ("attn1.to_q", "attn1.to_v"), torch.Generator().manual_seed(0))
    return data_uri(to_bytes(state), "application/octet-stream")


@pytest.mark.parametrize("condition", ["lineart", "softedge", "shuffle", "tile", "ip2p", "inpaint"])
def test_lora_and_preprocess_only_work_on_each_new_image(condition, tmp_path, monkeypatch):
    from cog_base.predictor import asset_settings
    from models.assets import AssetCache

    p = predictor(condition)
    monkeypatch.setattr(p, "assets", AssetCache(**{**asset_settings(), "root": str(tmp_path / "assets")}))
    path = holed(tmp_path / "in.png", (100, 60, 260, 200))  # its hole: inpaint's mask; composited away elsewhere
    fast = {**FAST, **({"detect_resolution": 128} if "detect_resolution" in p.extra_inputs else {})}
    plain = outputs(p.generate(path, "a house", **fast))
    styled = outputs(p.generate(path, "a house", lora_url=tiny_lora(p.runner.pipe), lora_scale=2.0, **fast))
    only = outputs(p.generate(path, "a house", preprocess_only=True, **fast))
    assert len(plain) == len(styled) == 2 and len(only) == 1
    np.testing.assert_array_equal(only[0], plain[0])
    np.testing.assert_array_equal(styled[0], plain[0])
    assert not np.array_equal(styled[1], plain[1])
