"""OpenPose body keypoints drawn as ControlNet 1.0's pose condition was trained on.

The network and its keypoint search (peaks, part affinity fields, people) are controlnet_aux's `Body`, the
pytorch-openpose code lllyasviel's annotator used, with one change of its 1.1 edit: it resamples heatmaps with
area/Lanczos instead of bicubic, which can move a keypoint by a pixel. The drawing is 1.0's, not
controlnet_aux's (1.1 dims the limbs and draws them under the joints): 18 COCO keypoints as filled circles in
their palette colours, then 17 limbs, each blended over the canvas at 60%, on black. Hands are not drawn,
as in 1.0's pose demo.

CMU's OpenPose model is licensed for non-commercial use only.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
# Importing any controlnet_aux submodule runs the package __init__, which imports every detector
# (a few seconds and a burst of timm/mediapipe warnings, once per process).
from controlnet_aux.open_pose.body import Body
from controlnet_aux.open_pose.model import bodypose_model
from controlnet_aux.open_pose.util import transfer

from models import default_device
from models.detectors import require_files

WEIGHTS_FILE = "body_pose_model.pth"  # as named in lllyasviel/Annotators

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


class PoseDetector:
    def __init__(self, body: Body):
        # Body maps a BGR image to (candidate, subset) as draw_bodypose reads them.
        self.body = body

    @property
    def network(self) -> torch.nn.Module:
        return self.body.model

    def __call__(self, image: np.ndarray) -> np.ndarray:
        # 1.0 flipped the RGB upload to BGR, the order OpenPose was trained on; the canvas keeps RGB colours.
        candidate, subset = self.body(np.ascontiguousarray(image[:, :, ::-1]))
        if len(subset) == 0:
            print(NO_PERSON, flush=True)
        return draw_bodypose(np.zeros_like(image), candidate, subset)

    @classmethod
    def from_weights(cls, folder: Path | None) -> "PoseDetector":
        folder = require_files(folder, [WEIGHTS_FILE], "pose")
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        # Body's constructor only reads a real-size file from a path; the network is all it keeps.
        body = Body.__new__(Body)
        body.model = _network(state).to(default_device())
        return cls(body)

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
