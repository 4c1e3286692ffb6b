"""Content shuffle as ControlNet 1.1's shuffle model was trained on it, reproducible per image."""

import cv2
import numpy as np
from controlnet_aux.util import make_noise_disk

from models.detectors.shuffle import FLOW_SCALE, SEED, ShuffleDetector
from tests.conftest import drawing


def annotator_shuffle(image, seed):
    """lllyasviel's 1.1 annotator/shuffle after the demo's np.random.seed(seed), flow at the image's size."""
    np.random.seed(seed)
    height, width = image.shape[:2]
    x = make_noise_disk(height, width, 1, FLOW_SCALE) * float(width - 1)
    y = make_noise_disk(height, width, 1, FLOW_SCALE) * float(height - 1)
    return cv2.remap(image, np.concatenate([x, y], axis=2).astype(np.float32), None, cv2.INTER_LINEAR)


def test_map_is_the_1_1_annotators_with_the_fixed_seed():
    image = np.asarray(drawing(320, 256))
    shuffled = ShuffleDetector()(image)
    assert shuffled.shape == image.shape and shuffled.dtype == np.uint8
    np.testing.assert_array_equal(shuffled, annotator_shuffle(image, SEED))
    assert not np.array_equal(shuffled, image)


def test_the_same_image_gives_the_same_map_and_numpys_state_is_left_alone():
    image = np.asarray(drawing(256, 256))
    np.random.seed(1)
    expected_next = np.random.rand()
    np.random.seed(1)
    first = ShuffleDetector()(image)
    assert np.random.rand() == expected_next  # the global random state is restored
    np.testing.assert_array_equal(first, ShuffleDetector()(image))


def test_it_keeps_the_images_colours_not_its_layout():
    image = np.asarray(drawing(320, 256))
    shuffled = ShuffleDetector()(image).astype(np.float64)
    # Resampled from the image itself: the same colours (roughly the same mean) in other places.
    assert np.abs(shuffled.mean(axis=(0, 1)) - image.mean(axis=(0, 1))).max() < 40
    assert np.abs(shuffled - image).mean() > 10
