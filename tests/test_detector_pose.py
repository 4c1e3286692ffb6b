import math

import cv2
import numpy as np
import pytest
import torch
from controlnet_aux.open_pose.face import FaceNet
from controlnet_aux.open_pose.model import bodypose_model, handpose_model

from models.detectors.pose import FACE_FILE, HAND_FILE, NO_PERSON, WEIGHTS_FILE, PoseDetector, _network, draw_bodypose
from tests.conftest import drawing

# ControlNet 1.0's annotator/openpose/util.py palette: keypoint i and limb i are drawn in colour i.
PALETTE_1_0 = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]
LIMBS_1_0 = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
             (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]


def people(*skeletons):
    """candidate / subset as Body returns them, from {keypoint number (1-18): (x, y)} per person."""
    candidate, subset = [], []
    for skeleton in skeletons:
        row = -np.ones(20)
        for part, (x, y) in skeleton.items():
            row[part - 1] = len(candidate)
            candidate.append((x, y, 0.9, len(candidate)))
        subset.append(row)
    return np.array(candidate, dtype=float).reshape(-1, 4), np.array(subset).reshape(-1, 20)


STANDING = {1: (96, 30), 2: (96, 52), 3: (76, 54), 4: (66, 80), 5: (60, 104), 6: (116, 54), 7: (126, 80),
            8: (132, 104), 9: (84, 110), 10: (82, 140), 11: (80, 170), 12: (108, 110), 13: (110, 140),
            14: (112, 170), 15: (90, 25), 16: (102, 25), 17: (84, 28), 18: (108, 28)}


def reference(height, width, candidate, subset):
    """The 1.0 drawing, restated: all joints as radius-4 discs, then each limb, person by person, as an
    ellipse of half-width 4 blended 40/60 over everything drawn so far."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for part in range(18):
        for person in subset:
            if person[part] >= 0:
                x, y = candidate[int(person[part])][:2]
                cv2.circle(canvas, (int(x), int(y)), 4, PALETTE_1_0[part], -1)
    for limb, (a, b) in enumerate(LIMBS_1_0):
        for person in subset:
            if person[a - 1] < 0 or person[b - 1] < 0:
                continue
            (x1, y1), (x2, y2) = (candidate[int(person[k - 1])][:2] for k in (a, b))
            polygon = cv2.ellipse2Poly(
                (int((x1 + x2) / 2), int((y1 + y2) / 2)),
                (int(((x1 - x2) ** 2 + (y1 - y2) ** 2) ** 0.5 / 2), 4),
                int(math.degrees(math.atan2(y1 - y2, x1 - x2))), 0, 360, 1,
            )
            overlay = canvas.copy()
            cv2.fillConvexPoly(overlay, polygon, PALETTE_1_0[limb])
            canvas = cv2.addWeighted(canvas, 0.4, overlay, 0.6, 0)
    return canvas


def test_two_people_are_drawn_exactly_as_1_0_drew_them():
    shifted = {part: (x + 90, y + 6) for part, (x, y) in STANDING.items() if part not in (4, 5, 17)}
    candidate, subset = people(STANDING, shifted)
    drawn = draw_bodypose(np.zeros((192, 256, 3), np.uint8), candidate, subset)
    np.testing.assert_array_equal(drawn, reference(192, 256, candidate, subset))
    assert drawn.any()


def test_joints_alone_are_discs_of_the_1_0_palette_on_black():
    # One person per keypoint: no limb has both ends, so only the discs are drawn.
    spots = {part: (20 + 24 * ((part - 1) % 9), 30 + 60 * ((part - 1) // 9)) for part in range(1, 19)}
    candidate, subset = people(*({part: spot} for part, spot in spots.items()))
    drawn = draw_bodypose(np.zeros((128, 240, 3), np.uint8), candidate, subset)
    for part, (x, y) in spots.items():
        assert tuple(drawn[y, x]) == PALETTE_1_0[part - 1]
        assert tuple(drawn[y + 4, x]) == PALETTE_1_0[part - 1] and not drawn[y + 6, x].any()
    colours = {tuple(c) for c in drawn.reshape(-1, 3)}
    assert colours == {(0, 0, 0), *PALETTE_1_0}


def test_a_limb_is_its_palette_colour_at_60_percent_over_black():
    # Nose to right eye is limb 14 (0-based 13), colour (85, 0, 255).
    candidate, subset = people({1: (40, 60), 15: (140, 60)})
    drawn = draw_bodypose(np.zeros((120, 180, 3), np.uint8), candidate, subset)
    assert tuple(drawn[60, 90]) == (51, 0, 153)  # 0.6 * (85, 0, 255), away from both joints
    assert tuple(drawn[60, 37]) == PALETTE_1_0[0]  # the nose disc beyond the limb's end keeps its colour
    assert tuple(drawn[60, 143]) == PALETTE_1_0[14]
    assert not drawn[50, 90].any()  # the stick is 4 pixels either side of its axis


class StubBody:
    """Stands in for controlnet_aux's Body: records what it was given, returns chosen keypoints."""

    def __init__(self, candidate, subset):
        self.result = candidate, subset

    def __call__(self, bgr):
        self.seen = bgr.copy()
        return self.result


def test_detector_draws_what_openpose_finds_on_black_at_the_image_size(capsys):
    image = np.asarray(drawing(256, 192))
    body = StubBody(*people(STANDING))
    pose_map = PoseDetector(body)(image)
    np.testing.assert_array_equal(body.seen, image[:, :, ::-1])  # OpenPose reads BGR, as 1.0 fed it
    np.testing.assert_array_equal(pose_map, reference(192, 256, *people(STANDING)))
    assert NO_PERSON not in capsys.readouterr().out


def test_no_person_gives_a_black_map_and_says_so(capsys):
    image = np.asarray(drawing(256, 192))
    pose_map = PoseDetector(StubBody(np.zeros((0, 4)), -np.ones((0, 20))))(image)
    assert pose_map.shape == image.shape and pose_map.dtype == np.uint8
    assert not pose_map.any()
    assert NO_PERSON in capsys.readouterr().out


def test_real_widths_rebuild_bodypose_model_layer_for_layer():
    """So the real body_pose_model.pth (bare, unprefixed keys) loads through the same loader as the tiny one."""
    with torch.device("meta"):
        theirs = bodypose_model()
        state = {key.split(".", 1)[1]: value for key, value in theirs.state_dict().items()}
        ours = _network(state)
    assert repr(ours) == repr(theirs)
    assert all(ours.state_dict()[key].shape == value.shape for key, value in theirs.state_dict().items())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotators-openpose")
    PoseDetector.save_random(folder)
    return folder


def test_tiny_file_has_the_real_key_names_narrower(folder):
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_FILE, HAND_FILE, FACE_FILE])
    # The hand file's keys lack the block prefix as the body's; the face file keeps FaceNet's names.
    with torch.device("meta"):
        hand = {key.split(".", 1)[1] for key in handpose_model().state_dict()}
        face = set(FaceNet().state_dict())
    assert set(torch.load(folder / HAND_FILE, weights_only=True)) == hand
    assert set(torch.load(folder / FACE_FILE, weights_only=True)) == face
    saved = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    with torch.device("meta"):
        real = {key.split(".", 1)[1]: value for key, value in bodypose_model().state_dict().items()}
    assert list(saved) == list(real)
    assert saved["conv1_1.weight"].shape[1] == 3  # RGB in
    assert saved["Mconv7_stage6_L1.weight"].shape[0] == 38 and saved["Mconv7_stage6_L2.weight"].shape[0] == 19
    assert (folder / WEIGHTS_FILE).stat().st_size < 5e6


def test_tiny_network_loads_runs_and_finds_nobody(folder, capsys):
    detector = PoseDetector.from_weights(folder)
    saved = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    loaded = detector.network.state_dict()
    assert all(torch.equal(saved[key.split(".", 1)[1]], value.cpu()) for key, value in loaded.items())
    pose_map = detector(np.asarray(drawing(256, 192)))
    assert pose_map.shape == (192, 256, 3) and not pose_map.any()
    assert NO_PERSON in capsys.readouterr().out


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make weights COND=pose"):
        PoseDetector.from_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        PoseDetector.from_weights(None)
