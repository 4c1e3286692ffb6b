import cv2
import numpy as np
import pytest

from models.detectors.normal import NormalDetector, depth_to_normal
from models.midas import WEIGHTS_FILE
from tests.conftest import drawing

# (x, y, z) = (0, 0, 1) -> (127.5, 127.5, 255) truncated to uint8, returned as (z, y, x).
FLAT = (255, 127, 127)
# Sobel's 3x3 kernel turns a slope s into 8s, so s = 2π/8 gives |x| = z and a 45° normal:
# 127.5 ± 127.5 / √2 = 217.66 or 37.34, truncated.
SLOPE = np.pi / 4


def ramp(slope: float, height: int = 12, width: int = 17, axis: int = 1) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return ((cols if axis == 1 else rows) * slope).astype(np.float32)


def test_constant_depth_gives_the_flat_normal_with_z_first():
    normal = depth_to_normal(np.full((8, 10), 3.0), bg_threshold=0.0)
    assert normal.shape == (8, 10, 3)
    assert normal.dtype == np.uint8
    assert (normal == FLAT).all()


def test_depth_rising_to_the_right_tilts_the_last_channel_up():
    normal = depth_to_normal(ramp(SLOPE), bg_threshold=0.0)
    # The border columns see a zero gradient (OpenCV reflects the image at its edges).
    assert (normal[:, 1:-1] == (217, 127, 217)).all()
    assert (normal[:, [0, -1]] == FLAT).all()


def test_depth_falling_to_the_right_tilts_the_last_channel_down():
    normal = depth_to_normal(ramp(-SLOPE), bg_threshold=0.0)
    assert (normal[:, 1:-1] == (217, 127, 37)).all()


def test_depth_rising_downwards_tilts_the_middle_channel():
    normal = depth_to_normal(ramp(SLOPE, axis=0), bg_threshold=0.0)
    assert (normal[1:-1] == (217, 217, 127)).all()


def test_background_threshold_flattens_the_far_part():
    # Normalised depth is column / 20: columns 0-9 lie below 0.5.
    depth = ramp(SLOPE, width=21)
    assert (depth_to_normal(depth, bg_threshold=0.5)[:, :10] == FLAT).all()
    assert (depth_to_normal(depth, bg_threshold=0.5)[:, 10:-1] == (217, 127, 217)).all()
    assert (depth_to_normal(depth, bg_threshold=0.0)[:, 1:-1] == (217, 127, 217)).all()


def test_map_can_be_resized_by_the_caller():
    normal = depth_to_normal(ramp(SLOPE), bg_threshold=0.0)
    assert cv2.resize(normal, (34, 24), interpolation=cv2.INTER_LINEAR).shape == (24, 34, 3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotators-midas")
    NormalDetector.save_random(folder)
    return folder


@pytest.fixture(scope="module")
def detector(folder):
    return NormalDetector.from_weights(folder)


@pytest.fixture(scope="module")
def image():
    # Not square: MiDaS runs on the detect-resolution image as it is (sides are multiples of 64 there).
    return np.array(drawing(width=256, height=192))


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make weights COND=normal"):
        NormalDetector.from_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        NormalDetector.from_weights(None)


@pytest.fixture(scope="module")
def depth(detector, image):
    return detector.depth(image)


def test_depth_has_the_input_size(depth, image):
    assert depth.shape == image.shape[:2]
    assert depth.dtype == np.float32


def test_map_is_the_normal_of_the_depth(detector, image, depth):
    normal = detector(image, bg_threshold=0.3)
    assert normal.shape == image.shape
    assert normal.dtype == np.uint8
    assert np.array_equal(normal, depth_to_normal(depth, bg_threshold=0.3))


def test_same_image_same_depth(detector, image, depth):
    assert np.array_equal(detector.depth(image.copy()), depth)


def test_background_threshold_flattens_only_the_far_pixels(depth):
    far = (depth - depth.min()) / (depth.max() - depth.min()) < 0.3
    assert 0 < far.mean() < 1
    everything, foreground = depth_to_normal(depth, bg_threshold=0.0), depth_to_normal(depth, bg_threshold=0.3)
    assert (foreground[far] == FLAT).all()
    assert not (everything[far] == FLAT).all()  # so the threshold did change something
    assert np.array_equal(foreground[~far], everything[~far])


def test_z_channel_comes_first(depth):
    normal = depth_to_normal(depth, bg_threshold=0.0).astype(int)
    # z > 0 everywhere, so its channel never drops below the middle; x and y tilt both ways.
    assert normal[..., 0].min() >= 127
    assert normal[..., 1].min() < 127 < normal[..., 1].max()
    assert normal[..., 2].min() < 127 < normal[..., 2].max()
