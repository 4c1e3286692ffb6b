"""Soft edge maps as ControlNet 1.1's softedge model was trained on them (PiDiNet, HED, safe), from tiny
random networks."""

import numpy as np
import pytest
import torch
from controlnet_aux.util import safe_step

from models.detectors.hed import HedDetector
from models.detectors.softedge import HED_FILE, PIDI_FILE, PREPROCESSORS, SoftEdgeDetector
from tests.conftest import drawing
from tests.test_detector_hed import controlnet_hed


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("softedge")
    SoftEdgeDetector.save_random(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def detector(weights_folder):
    return SoftEdgeDetector.from_weights(weights_folder)


def annotator_pidinet(network, image, safe):
    """lllyasviel's 1.1 annotator/pidinet on the image as given (it reads BGR)."""
    with torch.no_grad():
        x = torch.from_numpy(image[:, :, ::-1].copy()).float().permute(2, 0, 1)[None] / 255.0
        edge = network(x)[-1].numpy()
    if safe:
        edge = safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)[0, 0]


@pytest.mark.parametrize("safe", [False, True])
def test_pidinet_map_is_the_1_1_annotators_at_the_input_size(detector, safe):
    image = np.asarray(drawing(128, 64))
    edges = detector(image, softedge_preprocessor="pidinet_safe" if safe else "pidinet")
    assert edges.shape == (64, 128, 3) and edges.dtype == np.uint8
    expected = annotator_pidinet(detector.networks["pidinet"], image, safe)
    for channel in range(3):
        np.testing.assert_array_equal(edges[..., channel], expected)


def test_hed_is_the_hed_conditions_map_and_safe_quantises_it(detector):
    image = np.asarray(drawing(128, 64))
    hed = detector(image, softedge_preprocessor="hed")
    np.testing.assert_array_equal(hed, HedDetector(detector.networks["hed"])(image))
    np.testing.assert_array_equal(hed[..., 0], controlnet_hed(detector.networks["hed"], image))
    safe = detector(image, softedge_preprocessor="hed_safe")
    assert safe.shape == hed.shape and not np.array_equal(safe, hed)
    # safe_step keeps step + 1 = 3 levels of 0-1 edge strength (0, 0.5, 1), so at most three values.
    assert set(np.unique(safe)) <= {0, 127, 255}


def test_each_choice_is_its_own_map(detector):
    image = np.asarray(drawing(64, 64))
    maps = [detector(image, softedge_preprocessor=p).tobytes() for p in PREPROCESSORS]
    assert len(set(maps)) == len(PREPROCESSORS)


def test_choices_match_the_registry_with_pidinet_first_as_in_the_demo():
    from cog_base.inputs import Inputs

    assert tuple(Inputs.softedge_preprocessor.json_schema_extra["enum"]) == PREPROCESSORS
    assert Inputs.softedge_preprocessor.default == "pidinet"
    with pytest.raises(ValueError, match="pidinet, pidinet_safe, hed, hed_safe"):
        SoftEdgeDetector(torch.nn.Identity(), torch.nn.Identity())(np.zeros((64, 64, 3), np.uint8), softedge_preprocessor="canny")


def test_save_random_writes_the_files_controlnet_aux_reads(weights_folder, detector):
    assert sorted(p.name for p in weights_folder.iterdir()) == sorted([HED_FILE, PIDI_FILE])
    checkpoint = torch.load(weights_folder / PIDI_FILE, weights_only=True)
    assert all(key.startswith("module.") for key in checkpoint["state_dict"])  # DataParallel's, as released
    loaded = detector.networks["pidinet"].state_dict()
    assert {key.removeprefix("module.") for key in checkpoint["state_dict"]} == set(loaded)


def test_uploaded_maps_must_be_light_edges_on_black(detector):
    assert "not a map" in SoftEdgeDetector.map_problem(np.asarray(drawing(64, 64)))
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[20:24] = 200
    assert SoftEdgeDetector.map_problem(edges) is None


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make weights COND=softedge"):
        SoftEdgeDetector.from_weights(tmp_path)
