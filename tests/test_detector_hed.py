import cv2
import numpy as np
import pytest
import torch

from models.detectors.hed import WEIGHTS_FILE, HedDetector
from tests.conftest import drawing


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hed")
    HedDetector.save_random(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def detector(weights_folder):
    return HedDetector.from_weights(weights_folder)


def controlnet_hed(network, image):
    """lllyasviel's annotator/hed HEDdetector.__call__, on the image as given."""
    height, width = image.shape[:2]
    device = next(network.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(image.copy()).float().to(device).permute(2, 0, 1)[None]
        edges = [e.cpu().numpy().astype(np.float32)[0, 0] for e in network(x)]
    edges = np.stack([cv2.resize(e, (width, height), interpolation=cv2.INTER_LINEAR) for e in edges], axis=2)
    edge = 1 / (1 + np.exp(-np.mean(edges, axis=2).astype(np.float64)))
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def test_map_is_controlnet_hed_at_the_input_size(detector):
    image = np.asarray(drawing(192, 128))
    edges = detector(image)
    assert edges.shape == (128, 192, 3) and edges.dtype == np.uint8
    expected = controlnet_hed(detector.network, image)
    for channel in range(3):
        np.testing.assert_array_equal(edges[..., channel], expected)
    assert len(np.unique(edges)) > 10  # soft edges, not a binary map


def test_deterministic(detector):
    image = np.asarray(drawing(128, 128))
    np.testing.assert_array_equal(detector(image), detector(image))


def test_save_random_writes_the_real_file_layout(weights_folder, detector):
    assert sorted(p.name for p in weights_folder.iterdir()) == [WEIGHTS_FILE]
    state = torch.load(weights_folder / WEIGHTS_FILE, weights_only=True)
    loaded = detector.network.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[name], loaded[name].cpu()) for name in state)


def test_loaded_weights_drive_the_map(weights_folder, detector, tmp_path):
    HedDetector.save_random(tmp_path, seed=1)
    image = np.asarray(drawing(128, 128))
    np.testing.assert_array_equal(detector(image), HedDetector.from_weights(weights_folder)(image))
    assert not np.array_equal(detector(image), HedDetector.from_weights(tmp_path)(image))


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make weights COND=hed"):
        HedDetector.from_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        HedDetector.from_weights(None)
