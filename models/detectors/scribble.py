"""A user's drawing -> white strokes on black (ControlNet 1.0's gradio_scribble2image; no network).

ControlNet 1.0 expects dark strokes on light paper and marks every pixel whose darkest channel is
below 127, so a coloured stroke counts as long as one channel is dark. Drawing apps on a dark canvas
produce the opposite polarity, which the original turned into a mostly white map; we invert those
first, so both polarities give the same map.
"""

from __future__ import annotations

import numpy as np

from models.image import binary_map_problem, to_three_channels

STROKE_BELOW = 127  # darkest channel < this is ink on light paper
# The paper is judged on a band around the edge: people draw in the middle, and the band is wide
# enough that a thin frame drawn along the edge or a stroke running off the page stays a minority.
BORDER_FRACTION = 0.05


class ScribbleDetector:
    map_problem = staticmethod(binary_map_problem)  # an uploaded map must be strokes: white on black

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if _dark_paper(image):
            image = 255 - image
        strokes = image.min(axis=2) < STROKE_BELOW
        return to_three_channels(np.where(strokes, np.uint8(255), np.uint8(0)))

    @classmethod
    def from_weights(cls, folder=None) -> "ScribbleDetector":
        return cls()


def _dark_paper(image: np.ndarray) -> bool:
    """True when most of the border would count as strokes, i.e. the paper itself is dark.

    The border, not the whole image: a drawing with large filled shapes can be mostly ink in the
    middle while its paper still shows around the edge.
    """
    darkest = image.min(axis=2)
    height, width = darkest.shape
    band = max(1, round(BORDER_FRACTION * min(height, width)))
    border = np.concatenate([
        darkest[:band].ravel(), darkest[-band:].ravel(),
        darkest[band:-band, :band].ravel(), darkest[band:-band, -band:].ravel(),
    ])
    return bool(np.median(border) < STROKE_BELOW)
