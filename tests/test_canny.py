import cv2
import numpy as np

from models.detectors.canny import CannyDetector
from tests.conftest import drawing


def test_matches_opencv_canny_on_every_channel():
    image = np.asarray(drawing())
    for low, high in [(100, 200), (30, 60), (200, 250)]:
        edges = CannyDetector()(image, low_threshold=low, high_threshold=high)
        expected = cv2.Canny(image, low, high)
        assert edges.shape == image.shape and edges.dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(edges[..., channel], expected)


def test_thresholds_change_the_map():
    image = np.asarray(drawing())
    loose = CannyDetector()(image, low_threshold=10, high_threshold=20)
    strict = CannyDetector()(image, low_threshold=200, high_threshold=250)
    assert (loose > 0).sum() > (strict > 0).sum() > 0
    assert set(np.unique(loose)) <= {0, 255}
