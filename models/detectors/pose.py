"""OpenPose body keypoints drawn as ControlNet 1.0's pose condition was trained on.

The network and its keypoint search (peaks, part affinity fields, people) are controlnet_aux's `Body`, the
pytorch-openpose code lllyasviel's annotator used, with one change of its 1.1 edit: it resamples heatmaps with
area/Lanczos instead of bicubic, which can move a keypoint by a pixel. The drawing is 1.0's, not
controlnet_aux's (1.1 dims the limbs and draws them under the joints): 18 COCO keypoints as filled circles in
their palette colours, then 17 limbs, each blended over the canvas at 60%, on black. Hands and face are
drawn only when asked (`pose_hands_face`; 1.0's demo drew neither): controlnet_aux's OpenposeDetector finds
them (its hand and face networks) and draws them as 1.1 did. `drawing="1.1"` draws the body as 1.1 (and
controlnet_aux) did, for the 1.1 model: dimmed limbs under the joints.

CMU's OpenPose model is licensed for non-commercial use only.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import cv2
import numpy as np
import torch
# Importing any controlnet_aux submodule runs the package __init__, which imports every detector
# (a few seconds and a burst of timm/mediapipe warnings, once per process).
from controlnet_aux.open_pose import OpenposeDetector
from controlnet_aux.open_pose import util as aux_util
from controlnet_aux.open_pose.body import Body, Keypoint
from controlnet_aux.open_pose.face import Face, FaceNet
from controlnet_aux.open_pose.face import params as face_params
from controlnet_aux.open_pose.hand import Hand
from controlnet_aux.open_pose.model import bodypose_model, handpose_model
from controlnet_aux.open_pose.util import transfer

from models import default_device
from models.detectors import fit_to_state, require_files

WEIGHTS_FILE = "body_pose_model.pth"  # as named in lllyasviel/Annotators
HAND_FILE, FACE_FILE = "hand_pose_model.pth", "facenet.pth"
DRAWINGS = ("1.0", "1.1")

# 1-based keypoint pairs (COCO order: nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist,
# right hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right ear, left ear). 1.0 listed two more
# pairs (ear-shoulder) but drew only these 17.
LIMBS = [
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
    (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
]
# One colour per keypoint, and limb i takes colour i.
COLORS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]
STICK_WIDTH = 4
NO_PERSON = "pose: no person found; the control map is black"


def draw_bodypose(canvas: np.ndarray, candidate: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """1.0's util.draw_bodypose. candidate: rows of (x, y, score, id) in pixels; subset: one row per person
    whose first 18 entries index candidate (-1 = keypoint not found)."""
    for part, color in enumerate(COLORS):
        for person in subset:
            index = int(person[part])
            if index != -1:
                x, y = candidate[index][0:2]
                cv2.circle(canvas, (int(x), int(y)), 4, color, thickness=-1)
    for (start, end), color in zip(LIMBS, COLORS):
        for person in subset:
            indices = person[[start - 1, end - 1]]
            if -1 in indices:
                continue
            xs, ys = candidate[indices.astype(int), 0], candidate[indices.astype(int), 1]
            length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = cv2.ellipse2Poly(
                (int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
            )
            limb = canvas.copy()
            cv2.fillConvexPoly(limb, polygon, color)
            canvas = cv2.addWeighted(canvas, 0.4, limb, 0.6, 0)
    return canvas


def _network(state: dict[str, torch.Tensor]) -> bodypose_model:
    """bodypose_model with each convolution as wide as the file's: the real widths for the real file, narrow
    ones for the tiny file (same layers, names and format)."""
    with torch.device("meta"):
        network = bodypose_model()
        for block in network.children():
            for name, layer in block.named_children():
                if isinstance(layer, torch.nn.Conv2d):
                    out_channels, in_channels = state[f"{name}.weight"].shape[:2]
                    setattr(block, name, torch.nn.Conv2d(
                        in_channels, out_channels, layer.kernel_size, layer.stride, layer.padding
                    ))
    # The file's keys lack the block prefix (conv1_1.weight, not model0.conv1_1.weight); transfer maps them.
    network.load_state_dict(transfer(network, state), assign=True)
    return network.eval()


def _narrow(network: bodypose_model, divisor: int) -> None:
    """Divide every hidden width by `divisor`, keeping the RGB input, the 38 part-affinity and 19 heatmap
    outputs of each stage and the stage inputs built from them."""
    outputs = {38, 19}
    for block in network.children():
        for name, layer in block.named_children():
            if isinstance(layer, torch.nn.Conv2d):
                out_channels, in_channels = layer.out_channels, layer.in_channels
                out_channels = out_channels if out_channels in outputs else out_channels // divisor
                # Stages 2-6 read the 128 features plus both previous outputs (128 + 38 + 19 = 185).
                in_channels = {3: 3, 185: 128 // divisor + 57}.get(in_channels, in_channels // divisor)
                setattr(block, name, torch.nn.Conv2d(in_channels, out_channels, layer.kernel_size, layer.stride,
                                                     layer.padding))


HAND_EDGES = [
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
    (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
]
EPS = 0.01  # controlnet_aux's: a keypoint at 0 (not found) is not drawn


def draw_handpose(canvas: np.ndarray, keypoints) -> np.ndarray:
    """controlnet_aux's util.draw_handpose (1.1's), with the standard library's HSV conversion: its own
    imports matplotlib for that one call, a 40 MB dependency the images otherwise lack."""
    if not keypoints:
        return canvas
    height, width = canvas.shape[:2]
    for i, (a, b) in enumerate(HAND_EDGES):
        x1, y1 = int(keypoints[a].x * width), int(keypoints[a].y * height)
        x2, y2 = int(keypoints[b].x * width), int(keypoints[b].y * height)
        if x1 > EPS and y1 > EPS and x2 > EPS and y2 > EPS:
            color = [c * 255 for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)]
            cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
    for keypoint in keypoints:
        x, y = int(keypoint.x * width), int(keypoint.y * height)
        if x > EPS and y > EPS:
            cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    return canvas


def _hand(state: dict[str, torch.Tensor]) -> Hand:
    """controlnet_aux's Hand at the file's widths (its constructor reads only a real-size file from a path)."""
    with torch.device("meta"):
        network = handpose_model()
    hand = Hand.__new__(Hand)
    hand.model = fit_to_state(network, transfer(network, state)).eval()
    return hand


def _face(state: dict[str, torch.Tensor]) -> Face:
    with torch.device("meta"):
        network = FaceNet()
    face = Face.__new__(Face)
    face.inference_size, face.sigma = face_params["inference_img_size"], face_params["gaussian_sigma"]
    face.threshold = face_params["heatmap_peak_thresh"]
    face.model = fit_to_state(network, state).eval()
    return face


def _random_narrow(network: torch.nn.Module, size: int, divisor: int = 16) -> dict[str, torch.Tensor]:
    """`network` (on meta, convolutions only) rebuilt with every hidden width divided by `divisor` (heatmap outputs kept: their
    counts are not multiples of 16) and random weights; its last layer's bias raised so that the tiny
    network finds a keypoint wherever it looks (tests then see hands and faces drawn)."""
    for parent in list(network.modules()):
        for name, layer in parent.named_children():
            if isinstance(layer, torch.nn.Conv2d):
                out = layer.out_channels // divisor if layer.out_channels % 16 == 0 else layer.out_channels
                setattr(parent, name, torch.nn.LazyConv2d(out, layer.kernel_size, layer.stride, layer.padding))
    with torch.no_grad():
        network(torch.zeros(1, 3, size, size))  # sizes the lazy layers
        last = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.bias.fill_(1.0)
    return network.state_dict()


class PoseDetector:
    def __init__(self, body: Body, hand: Hand | None = None, face: Face | None = None, load_hands_face=None):
        # Body maps a BGR image to (candidate, subset) as draw_bodypose reads them. The hand and face
        # networks (given, or loaded by `load_hands_face()` when first asked for) run only with pose_hands_face.
        self.body = body
        self._hand, self._face, self._load_hands_face = hand, face, load_hands_face

    @property
    def network(self) -> torch.nn.Module:
        return self.body.model

    def _hands_face(self) -> tuple[Hand, Face]:
        if self._hand is None:
            if self._load_hands_face is None:
                raise ValueError("pose_hands_face: this pose detector has no hand and face networks")
            self._hand, self._face = self._load_hands_face()
        return self._hand, self._face

    def __call__(self, image: np.ndarray, pose_hands_face: bool = False, drawing: str = "1.0") -> np.ndarray:
        if drawing not in DRAWINGS:
            raise ValueError(f"drawing must be one of {', '.join(DRAWINGS)}, not {drawing!r}")
        # 1.0 flipped the RGB upload to BGR, the order OpenPose was trained on; the canvas keeps RGB colours.
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        candidate, subset = self.body(bgr)
        if len(subset) == 0:
            print(NO_PERSON, flush=True)
        height, width = image.shape[:2]
        bodies = Body.format_body_result(candidate, subset)
        if drawing == "1.0":
            canvas = draw_bodypose(np.zeros_like(image), candidate, subset)
        else:
            canvas = np.zeros_like(image)
            for body in bodies:
                canvas = aux_util.draw_bodypose(canvas, [
                    None if k is None else Keypoint(x=k.x / width, y=k.y / height) for k in body.keypoints])
        if pose_hands_face and bodies:
            # controlnet_aux's detect_hands / detect_face, on the keypoints in pixels, as its detect_poses calls them.
            found = OpenposeDetector(self.body, *self._hands_face())
            for body in bodies:
                for hand in found.detect_hands(body, bgr):
                    canvas = draw_handpose(canvas, hand)
                canvas = aux_util.draw_facepose(canvas, found.detect_face(body, bgr))
        return canvas

    @classmethod
    def from_weights(cls, folder: Path | None) -> "PoseDetector":
        folder = require_files(folder, [WEIGHTS_FILE, HAND_FILE, FACE_FILE], "pose")
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        # Body's constructor only reads a real-size file from a path; the network is all it keeps.
        body = Body.__new__(Body)
        body.model = _network(state).to(default_device())

        def load_hands_face() -> tuple[Hand, Face]:
            # Loaded when a request first asks for them: a body-only server never holds them.
            read = lambda name: torch.load(folder / name, map_location="cpu", weights_only=True)  # noqa: E731
            return _hand(read(HAND_FILE)).to(default_device()), _face(read(FACE_FILE)).to(default_device())

        return cls(body, load_hands_face=load_hands_face)

    @classmethod
    def save_random(cls, folder: Path, seed: int = 0) -> None:
        """The real file is a bare state dict of bodypose_model (keys without the block prefix); this one has
        random weights, hidden widths divided by 16."""
        torch.manual_seed(seed)
        with torch.device("meta"):
            network = bodypose_model()
            _narrow(network, 16)
        network.to_empty(device="cpu")
        for layer in network.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.reset_parameters()
        with torch.no_grad():
            # Random heatmaps would put peaks everywhere and make the keypoint search quadratic in them;
            # far below its 0.1 threshold, the tiny network finds nobody, which the tests rely on.
            network.model6_2.Mconv7_stage6_L2.bias.fill_(-10.0)
        state = {key.split(".", 1)[1]: tensor for key, tensor in network.state_dict().items()}
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, folder / WEIGHTS_FILE)
        # The hand file's keys lack the block prefix, as the body's; the face file's keep their names.
        with torch.device("meta"):
            hand, face = handpose_model(), FaceNet()
        hand_state = _random_narrow(hand, 64)
        torch.save({key.split(".", 1)[1]: tensor for key, tensor in hand_state.items()}, folder / HAND_FILE)
        torch.save(_random_narrow(face, 64), folder / FACE_FILE)
