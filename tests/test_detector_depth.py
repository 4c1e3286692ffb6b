import numpy as np
import pytest
import torch

from models.detectors.depth import DepthDetector, depth_to_map
from models.midas import WEIGHTS_FILE
from tests.conftest import drawing


class Brightness(torch.nn.Module):
    """A stand-in MiDaS for a scene whose depth is known by construction: the brighter, the nearer."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return (x.mean(dim=1) + 1.0) * self.weight  # inverse depth, >= 0 like MiDaS's


def scene() -> tuple[np.ndarray, np.ndarray]:
    """A floor receding to a far wall, a box standing nearer than both; and each pixel's distance."""
    height, width = 128, 192
    distance = np.empty((height, width), np.float32)
    distance[:64] = 10.0  # the wall
    distance[64:] = np.linspace(10.0, 2.0, 64)[:, None]  # the floor comes towards the camera
    distance[70:120, 40:100] = 1.0  # the box
    brightness = (255 * 1.0 / distance).astype(np.uint8)  # what Brightness reads back as inverse depth
    return np.repeat(brightness[..., None], 3, axis=2), distance


def test_nearer_is_brighter_in_the_map():
    image, distance = scene()
    depth_map = DepthDetector(Brightness())(image)
    assert depth_map.shape == image.shape and depth_map.dtype == np.uint8
    grey = depth_map[..., 0].astype(int)
    assert (depth_map == grey[..., None]).all()  # grey in three channels
    assert (grey[distance == 1.0] == 255).all()  # the nearest thing is white
    assert (grey[distance == 10.0] == 0).all()  # the farthest black
    floor = grey[64:, 150]  # a column of floor, far to near
    assert (np.diff(floor) >= 0).all() and floor[-1] > floor[0]
    order = np.argsort(distance.ravel(), kind="stable")
    assert (np.diff(grey.ravel()[order]) <= 0).all()  # farther is never brighter


def test_map_is_1_0_min_max_normalisation_truncated():
    depth = np.array([[2.0, 3.0], [4.5, 6.0]], np.float32)
    expected = np.array([[0, 63], [159, 255]], np.uint8)  # (d - 2) / 4 * 255, truncated
    np.testing.assert_array_equal(depth_to_map(depth)[..., 0], expected)
    assert (depth_to_map(depth * 1e-4 + 7)[..., 0] == expected).all()  # only the ordering and spread matter


def test_constant_depth_gives_a_black_map_not_nans():
    assert (depth_to_map(np.full((8, 8), 3.0)) == 0).all()


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotators-midas")
    DepthDetector.save_random(folder)
    return DepthDetector.from_weights(folder)


def test_tiny_midas_map_is_monotone_in_its_depth_and_spans_the_range(detector):
    image = np.asarray(drawing(256, 192))
    depth, depth_map = detector.depth(image), detector(image)
    assert depth_map.shape == (192, 256, 3)
    grey = depth_map[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    assert len(np.unique(grey)) > 50  # a smooth depth, not a mask
    order = np.argsort(depth.ravel(), kind="stable")
    assert (np.diff(grey.ravel()[order].astype(int)) >= 0).all()


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make weights COND=depth"):
        DepthDetector.from_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        DepthDetector.from_weights(None)
