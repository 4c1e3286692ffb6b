"""Line art maps as ControlNet 1.1's lineart model was trained on them, from tiny random networks."""

import numpy as np
import pytest
import torch

from models.detectors.lineart import WEIGHTS_FILES, LineartDetector
from tests.conftest import drawing


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lineart")
    LineartDetector.save_random(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def detector(weights_folder):
    return LineartDetector.from_weights(weights_folder)


def annotator_lineart(network, image):
    """lllyasviel's 1.1 annotator/lineart on the image as given, then the 1.1 demo's `1 - map` (the model
    sees light lines on black), in 0-255."""
    with torch.no_grad():
        x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0
        line = network(x)[0][0].numpy()
    return 255 - (line * 255.0).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("style", ["realistic", "coarse"])
def test_map_is_the_1_1_annotators_inverted_at_the_input_size(detector, style):
    image = np.asarray(drawing(128, 64))
    lines = detector(image, lineart_preprocessor=style)
    assert lines.shape == (64, 128, 3) and lines.dtype == np.uint8
    expected = annotator_lineart(detector.networks[style], image)
    for channel in range(3):
        np.testing.assert_array_equal(lines[..., channel], expected)
    assert len(np.unique(lines)) > 10  # soft lines, not a binary map


def test_the_two_styles_are_two_networks(detector):
    image = np.asarray(drawing(64, 64))
    assert not np.array_equal(detector(image, lineart_preprocessor="realistic"), detector(image, lineart_preprocessor="coarse"))


def test_an_unknown_style_is_refused_with_the_choices(detector):
    with pytest.raises(ValueError, match="realistic, coarse"):
        detector(np.asarray(drawing(64, 64)), lineart_preprocessor="anime")


def test_choices_match_the_registry():
    from cog_base.inputs import Inputs

    assert Inputs.lineart_preprocessor.json_schema_extra["enum"] == list(WEIGHTS_FILES)
    assert Inputs.lineart_preprocessor.default == "realistic"


def test_save_random_writes_the_real_file_layout(weights_folder, detector):
    assert sorted(p.name for p in weights_folder.iterdir()) == sorted(WEIGHTS_FILES.values())
    for style, name in WEIGHTS_FILES.items():
        state = torch.load(weights_folder / name, weights_only=True)
        loaded = detector.networks[style].state_dict()
        assert state.keys() == loaded.keys()
        assert all(torch.equal(state[key], loaded[key].cpu()) for key in state)


def test_uploaded_maps_must_be_light_lines_on_black():
    lines = np.zeros((64, 64, 3), np.uint8)
    lines[30:34] = 180  # a soft line on black, as the real networks draw
    assert LineartDetector.map_problem(lines) is None
    assert "invert" in LineartDetector.map_problem(255 - lines)  # dark on light paper: the demo's upload
    assert "not a map" in LineartDetector.map_problem(np.asarray(drawing(64, 64)))


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make weights COND=lineart"):
        LineartDetector.from_weights(tmp_path)
