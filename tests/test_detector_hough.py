import cv2
import numpy as np
import pytest
import torch

from models.detectors.hough import WEIGHTS_FILE, HoughDetector
from tests.conftest import drawing

# A random M-LSD finds no meaningful lines, so the line decoding is exercised with a stand-in network
# whose output encodes known segments the way M-LSD does: channel 0 is a centre-score logit per cell,
# channels 1-4 the displacement from the centre to the segment's start and end, on a map half the
# size of the network input.
CONFIDENT, UNSURE, BACKGROUND = 10.0, 0.0, -20.0  # sigmoid: ~1.0, 0.5, ~0


class EncodedLines(torch.nn.Module):
    def __init__(self, segments):
        """segments: [((x0, y0, x1, y1), logit)] in map coordinates (half the input size)."""
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # pred_lines reads the device from it
        self.segments = segments
        self.inputs = []

    def forward(self, batch):
        self.inputs.append(batch.clone())
        _, _, height, width = batch.shape
        out = torch.zeros(1, 9, height // 2, width // 2)
        out[0, 0] = BACKGROUND
        for (x0, y0, x1, y1), logit in self.segments:
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            out[0, 0, cy, cx] = logit
            out[0, 1:5, cy, cx] = torch.tensor([x0 - cx, y0 - cy, x1 - cx, y1 - cy], dtype=torch.float32)
        return out


def rectangle_segments(x0, y0, x1, y1, logit=CONFIDENT):
    return [((x0, y0, x1, y0), logit), ((x1, y0, x1, y1), logit), ((x1, y1, x0, y1), logit), ((x0, y1, x0, y0), logit)]


def drawn_rectangle(size, corners):
    image = np.full((size, size, 3), 255, np.uint8)
    cv2.rectangle(image, corners[:2], corners[2:], (0, 0, 0), 3)
    return image


def test_finds_the_lines_of_a_drawn_rectangle():
    corners = (40, 48, 216, 176)
    network = EncodedLines(rectangle_segments(*[c // 2 for c in corners]))
    lines = HoughDetector(network)(drawn_rectangle(256, corners))

    expected = np.zeros((256, 256), np.uint8)
    cv2.rectangle(expected, corners[:2], corners[2:], 255, 1)
    assert lines.shape == (256, 256, 3) and lines.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(lines[..., channel], expected)
    # M-LSD's input: the image at its own size, scaled to [-1, 1], plus a constant channel.
    (batch,) = network.inputs
    assert batch.shape == (1, 4, 256, 256)
    assert batch[0, :3].min() == -1.0 and batch[0, :3].max() == 1.0
    assert torch.unique(batch[0, 3]).numel() == 1


def test_value_threshold_drops_unsure_lines():
    strong = rectangle_segments(10, 10, 50, 50)
    weak = rectangle_segments(70, 70, 110, 110, logit=UNSURE)
    detector = HoughDetector(EncodedLines(strong + weak))
    image = np.full((256, 256, 3), 255, np.uint8)
    loose = detector(image, value_threshold=0.1)
    strict = detector(image, value_threshold=0.6)
    assert loose[140:221, 140:221].any() and not strict[140:221, 140:221].any()
    np.testing.assert_array_equal(loose[:110], strict[:110])


def test_distance_threshold_drops_short_lines():
    long_line, short_line = ((10, 10, 110, 10), CONFIDENT), ((10, 60, 20, 60), CONFIDENT)  # 100 and 10 cells
    detector = HoughDetector(EncodedLines([long_line, short_line]))
    image = np.full((256, 256, 3), 255, np.uint8)
    loose = detector(image, distance_threshold=5.0)
    strict = detector(image, distance_threshold=20.0)
    assert loose[120].any() and not strict[120].any()
    assert loose[20].any() and strict[20].any()


def test_no_line_gives_an_empty_map():
    lines = HoughDetector(EncodedLines([]))(np.full((128, 192, 3), 255, np.uint8))
    assert lines.shape == (128, 192, 3) and not lines.any()


def test_sizes_the_network_does_not_take_are_rounded_and_lines_scaled_back():
    # A full-width line across the network map must span the full width of the image.
    network = EncodedLines([((0, 40, 160, 40), CONFIDENT)])
    lines = HoughDetector(network)(np.full((200, 300, 3), 255, np.uint8))
    assert network.inputs[0].shape == (1, 4, 192, 320)
    assert lines.shape == (200, 300, 3)
    rows = np.flatnonzero(lines[..., 0].any(axis=1))
    assert len(rows) == 1 and abs(rows[0] - 80 * 200 / 192) <= 1
    assert lines[rows[0], :, 0].sum() // 255 >= 299


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlsd")
    HoughDetector.save_random(folder, seed=0)
    return folder


def test_save_random_writes_the_real_file_layout(weights_folder):
    assert sorted(p.name for p in weights_folder.iterdir()) == [WEIGHTS_FILE]
    state = torch.load(weights_folder / WEIGHTS_FILE, weights_only=True)
    loaded = HoughDetector.from_weights(weights_folder).model.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[name], loaded[name].cpu()) for name in state)


def test_random_network_map_is_binary_sized_and_deterministic(weights_folder):
    detector = HoughDetector.from_weights(weights_folder)
    image = np.asarray(drawing(256, 192))
    first, second = detector(image), detector(image)
    assert first.shape == (192, 256, 3) and first.dtype == np.uint8
    assert set(np.unique(first)) <= {0, 255}
    np.testing.assert_array_equal(first, second)


def test_seed_changes_the_weights(weights_folder, tmp_path):
    HoughDetector.save_random(tmp_path, seed=1)
    a = torch.load(weights_folder / WEIGHTS_FILE, weights_only=True)
    b = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    assert not torch.equal(a["block23.conv2.0.weight"], b["block23.conv2.0.weight"])


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make weights COND=hough"):
        HoughDetector.from_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        HoughDetector.from_weights(None)
