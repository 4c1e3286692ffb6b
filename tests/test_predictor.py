"""The shared base through the canny predictor's plain method (no HTTP)."""

import cv2
import numpy as np
import pytest
from PIL import Image

from predictors.canny.predict import Predictor

FAST = dict(ddim_steps=2, image_resolution="256")


@pytest.fixture(scope="module")
def predictor():
    p = Predictor()
    p.setup()
    return p


def pixels(path):
    return np.asarray(Image.open(path))


def test_control_map_first_then_one_sample_at_the_sized_resolution(predictor, image_file):
    files = predictor.generate(image_file(), "a house", seed=1, **FAST)
    assert len(files) == 2
    assert [Image.open(f).size for f in files] == [(320, 256), (320, 256)]  # 400x300 -> short side 256
    assert all(Image.open(f).format == "PNG" for f in files)


def test_control_map_is_canny_of_the_resized_image(predictor, image_file):
    path = image_file()
    control = pixels(predictor.generate(path, "x", seed=1, low_threshold=50, high_threshold=150, **FAST)[0])
    resized = cv2.resize(np.asarray(Image.open(path)), (320, 256), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(control[..., 0], cv2.Canny(resized, 50, 150))


def test_same_seed_same_pixels_different_seed_different_pixels(predictor, image_file):
    path = image_file()
    first = pixels(predictor.generate(path, "a house", seed=42, **FAST)[1])
    again = pixels(predictor.generate(path, "a house", seed=42, **FAST)[1])
    other = pixels(predictor.generate(path, "a house", seed=43, **FAST)[1])
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 0.5


def test_the_control_map_reaches_the_pipeline(predictor, image_file):
    path = image_file()
    busy = pixels(predictor.generate(path, "a", seed=5, low_threshold=10, high_threshold=20, **FAST)[1])
    sparse = pixels(predictor.generate(path, "a", seed=5, low_threshold=250, high_threshold=255, **FAST)[1])
    assert np.abs(busy.astype(int) - sparse.astype(int)).mean() > 0.5


def test_four_samples_give_five_distinct_files(predictor, image_file):
    files = predictor.generate(image_file(), "a house", num_samples="4", seed=7, **FAST)
    assert len(files) == 5 and len(set(files)) == 5
    samples = [pixels(f) for f in files[1:]]
    assert not np.array_equal(samples[0], samples[1])


@pytest.mark.parametrize("resolution, size", [("256", (320, 256)), ("512", (704, 512))])
def test_image_resolution_sets_the_short_side_and_keeps_aspect(predictor, image_file, resolution, size):
    files = predictor.generate(image_file(), "x", seed=1, ddim_steps=1, image_resolution=resolution)
    assert {Image.open(f).size for f in files} == {size}


def test_portrait_input_stays_portrait(predictor, image_file):
    files = predictor.generate(image_file(width=300, height=400), "x", seed=1, **FAST)
    assert Image.open(files[1]).size == (256, 320)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_other_image_modes_are_accepted(predictor, image_file, mode):
    files = predictor.generate(image_file(mode=mode), "x", seed=1, **FAST)
    assert [pixels(f).shape for f in files] == [(256, 320, 3)] * 2


def test_seed_used_is_logged_and_random_when_absent(predictor, image_file, capsys):
    predictor.generate(image_file(), "x", seed=123, **FAST)
    assert "Using seed: 123" in capsys.readouterr().out
    seeds = set()
    for seed in (None, -1, 0, 0):  # 0 is random too, as `if not seed` made it in the originals
        predictor.generate(image_file(), "x", seed=seed, **FAST)
        seeds.add(int(capsys.readouterr().out.split("Using seed: ")[1].split()[0]))
    assert len(seeds) == 4 and 0 not in seeds  # a logged seed reproduces its images


def test_tiny_weights_are_announced_in_every_prediction(predictor, image_file, capsys):
    predictor.generate(image_file(), "x", seed=1, **FAST)
    assert "TINY RANDOM-WEIGHT" in capsys.readouterr().out


def test_outputs_of_the_previous_prediction_are_cleaned_up(predictor, image_file):
    old = predictor.generate(image_file(), "x", seed=1, **FAST)
    predictor.generate(image_file(), "x", seed=1, **FAST)
    assert not any(f.exists() for f in old)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(num_samples="7"), "num_samples must be one of 1, 4"),
        (dict(image_resolution="300"), "image_resolution must be one of 256, 512, 768"),
        (dict(ddim_steps=0), "ddim_steps must be between 1 and 100"),
        (dict(scale=31.0), "scale must be between"),
        (dict(eta=-0.1), "eta must be between"),
        (dict(seed=2**32), "seed must be between"),
        (dict(prompt="  "), "prompt must not be empty"),
    ],
)
def test_bad_values_get_errors_that_say_what_to_fix(predictor, image_file, override, message):
    args = dict(image=image_file(), prompt="x", seed=1, **FAST) | override
    with pytest.raises(ValueError, match=message):
        predictor.generate(**args)


def test_non_image_upload_is_a_clear_error(predictor, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="could not be decoded"):
        predictor.generate(bad, "x", seed=1, **FAST)


def test_no_output_folder_outlives_its_predictor(image_file):
    import gc
    import os

    p = Predictor()
    p.setup()
    files = p.generate(image_file(), "x", seed=1, **FAST)
    folder = files[0].parent
    del p, files
    gc.collect()
    assert not os.path.exists(folder)
