import cv2
import numpy as np

from models.detectors.scribble import ScribbleDetector


def paper(height=192, width=256, colour=(255, 255, 255)):
    return np.full((height, width, 3), colour, np.uint8)


def strokes_on(image, colour=(0, 0, 0)):
    cv2.line(image, (20, 30), (230, 160), colour, 4)
    cv2.circle(image, (128, 96), 40, colour, 3)
    return image


def as_mask(control_map):
    assert control_map.dtype == np.uint8 and control_map.shape[2] == 3
    assert set(np.unique(control_map)) <= {0, 255}
    for channel in (1, 2):
        np.testing.assert_array_equal(control_map[..., 0], control_map[..., channel])
    return control_map[..., 0] == 255


def test_black_strokes_become_white_strokes_exactly_where_drawn():
    image = strokes_on(paper())
    mask = as_mask(ScribbleDetector()(image))
    assert mask.shape == image.shape[:2]
    np.testing.assert_array_equal(mask, (image == 0).all(axis=2))


def test_white_on_black_gives_the_same_map():
    image = strokes_on(paper())
    np.testing.assert_array_equal(ScribbleDetector()(255 - image), ScribbleDetector()(image))


def test_threshold_is_darkest_channel_below_127():
    image = paper()
    image[10:20, 10:20] = 126
    image[30:40, 30:40] = 127
    mask = as_mask(ScribbleDetector()(image))
    assert mask[10:20, 10:20].all()
    assert not mask[30:40, 30:40].any()
    assert mask.sum() == 100


def test_coloured_strokes_count_by_their_darkest_channel():
    image = paper()
    image[10:20, 10:20] = (20, 30, 200)  # dark blue ink
    image[30:40, 30:40] = (200, 200, 255)  # pale blue: no channel below 127
    mask = as_mask(ScribbleDetector()(image))
    assert mask[10:20, 10:20].all() and not mask[30:40, 30:40].any()


def test_a_frame_along_the_edge_does_not_flip_the_paper():
    image = strokes_on(paper())
    cv2.rectangle(image, (0, 0), (255, 191), (0, 0, 0), 2)
    mask = as_mask(ScribbleDetector()(image))
    assert mask[0].all() and not mask[60, 60]


def test_mostly_inked_drawing_on_light_paper_is_not_inverted():
    image = paper()
    cv2.rectangle(image, (20, 20), (235, 171), (0, 0, 0), -1)  # ink covers ~75% of the page
    mask = as_mask(ScribbleDetector()(image))
    np.testing.assert_array_equal(mask, (image == 0).all(axis=2))


def test_blank_pages_of_either_colour_give_an_empty_map():
    assert not ScribbleDetector()(paper()).any()
    assert not ScribbleDetector()(paper(colour=(0, 0, 0))).any()


def test_needs_no_weights():
    assert isinstance(ScribbleDetector.from_weights(None), ScribbleDetector)
