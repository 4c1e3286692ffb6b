"""Units of control: one ControlNet's part in a request, and the ControlNets kept loaded for them.

A request holds one unit per ControlNet it uses (a single-condition image: exactly one). Each unit
names its condition (how the map is made, which ControlNet reads it), its image, its strength and
its window of steps. The pipeline (models/pipeline.py) turns the units into diffusers'
MultiControlNetModel lists; a unit that acts in no step is left out there.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from models.image import resize_map, resize_to, target_size


class NotAMapError(ValueError):
    """An upload sent as a control map is not one of its condition's maps (the message says why)."""


@dataclass(eq=False)
class Condition:
    """How one condition makes its control map, and where its ControlNet's weights are.

    load_detector   builds the detector (weights and all); called when an image first needs detecting
    map_check       `map_check(image) -> problem | None` for uploads sent as maps (None: any image)
    controlnet      the ControlNet's folder; None: the pipeline's own ControlNet
    detect_at_resolution: the detector runs on the input resized to `detect_resolution` and its map is
    resized to the sample size with `map_interpolation`; otherwise it runs on the image already at the
    sample size (canny, scribble).
    """

    name: str
    load_detector: Callable[[], Callable[..., np.ndarray]] | None
    detect_at_resolution: bool = True
    map_interpolation: str = "bilinear"
    map_check: Callable[[np.ndarray], str | None] | None = None
    controlnet: Path | None = None
    _detector: Any = field(default=None, repr=False)

    @property
    def detector(self) -> Callable[..., np.ndarray]:
        if self._detector is None and self.load_detector is not None:
            self._detector = self.load_detector()
        return self._detector

    @property
    def detector_loaded(self) -> bool:
        return self._detector is not None

    def detect(self, image: np.ndarray, size: tuple[int, int], detect_resolution: int, **options) -> np.ndarray:
        """The map at `size` (height, width), computed the way this condition computes it."""
        height, width = size
        if not self.detect_at_resolution:
            return self.detector(resize_to(image, height, width), **options)
        detect_h, detect_w = target_size(*image.shape[:2], detect_resolution)
        return self.fit_map(self.detector(resize_to(image, detect_h, detect_w), **options), size)

    def fit_map(self, control_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return resize_map(control_map, size[0], size[1], self.map_interpolation)


@dataclass
class ControlUnit:
    """One ControlNet's part in a request. `image` is the upload (already cropped to the sample's
    aspect); `map`, once made, is what the ControlNet reads, at the sample size. The window is a
    fraction of the steps, as diffusers' control_guidance_start/end."""

    condition: Condition
    image: np.ndarray | None = None
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    is_map: bool = False
    detect_resolution: int = 512
    options: dict = field(default_factory=dict)
    map: np.ndarray | None = None

    def make_map(self, size: tuple[int, int]) -> np.ndarray:
        if self.is_map:
            problem = self.condition.map_check(self.image) if self.condition.map_check else None
            if problem:
                raise NotAMapError(problem)
            self.map = self.condition.fit_map(self.image, size)
        else:
            self.map = self.condition.detect(self.image, size, self.detect_resolution, **self.options)
        return self.map

    def acts_within(self, steps: int) -> bool:
        """Whether the ControlNet acts in any of `steps` steps (diffusers' per-step keep rule)."""
        return any(i / steps >= self.start and (i + 1) / steps <= self.end for i in range(steps))


def max_controlnets_from_env() -> int:
    value = os.environ.get("CONTROLNET_MAX_LOADED", "3")
    try:
        bound = int(value)
    except ValueError:
        bound = 0
    if bound < 1:
        raise ValueError(f"CONTROLNET_MAX_LOADED must be a whole number >= 1, not {value!r}")
    return bound


class ControlNets:
    """ControlNets by folder, loaded on first use; beyond `max_loaded` the least recently used ones are
    dropped (never one the current request needs, so a request may hold more for its duration)."""

    def __init__(self, load: Callable[[Path], Any], max_loaded: int = 3, log: Callable[[str], None] = print,
                 release: Callable[[], None] = lambda: None):
        self._load, self.max_loaded, self.log, self._release = load, max_loaded, log, release
        self._loaded: OrderedDict[Path, Any] = OrderedDict()
        # What each model goes through once loaded (the fast path's per-model options, models/fast.py).
        self.prepare: Callable[[Any], Any] = lambda model: model

    def put(self, folder: Path, model) -> None:
        self._loaded[Path(folder)] = model

    @property
    def loaded(self) -> list[Path]:
        return list(self._loaded)

    def get(self, folders: list[Path]) -> list:
        """The models of `folders`, in order (a folder named twice gives the same model twice)."""
        wanted = list(dict.fromkeys(Path(f) for f in folders))
        for folder in wanted:
            if folder in self._loaded:
                self._loaded.move_to_end(folder)
                continue
            start = time.perf_counter()
            self._loaded[folder] = self.prepare(self._load(folder))
            self.log(f"loaded ControlNet {folder.name} in {time.perf_counter() - start:.1f}s")
        dropped = False
        for folder in list(self._loaded):
            if len(self._loaded) <= max(self.max_loaded, len(wanted)):
                break
            if folder not in wanted:
                del self._loaded[folder]
                self.log(f"unloaded ControlNet {folder.name} (CONTROLNET_MAX_LOADED={self.max_loaded})")
                dropped = True
        if dropped:
            self._release()
        return [self._loaded[Path(f)] for f in folders]



def import_class(path: str) -> type:
    """The class a "module:Class" declaration names."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def declared_conditions(declared: dict[str, Any], found: dict[str, Any], own: Any,
                        version_mark: str) -> tuple[dict[str, Condition], dict[tuple[str, str], Condition | None]]:
    """The Conditions an image serves, from what its predictors declare and where its weights are.

    declared  condition -> its declaration: `detector` ("module:Class" with `from_weights(folder)`),
              `detect_at_resolution`, `map_interpolation`, and `versions` (version -> what that version
              changes: `detector`, `detect_at_resolution`, `map_interpolation`, each None to keep the default's)
    found     condition -> its weights (`detector`, `controlnet`, `folders`); `own`, the image's own weights:
              a condition found there uses the pipeline's ControlNet
    Returns (condition -> Condition at the default version, (condition, version) -> Condition for each
    other version, None where the weights lack its ControlNet). Every detector loads when first needed;
    a version without a detector of its own shares the default version's (one instance).
    """
    conditions, versioned = {}, {}
    for name, spec in declared.items():
        weights, cls = found[name], import_class(spec.detector)
        conditions[name] = Condition(
            name, (lambda cls=cls, folder=weights.detector: cls.from_weights(folder)),
            spec.detect_at_resolution, spec.map_interpolation, getattr(cls, "map_problem", None),
            controlnet=None if weights is own else weights.controlnet,  # None: the pipeline's own
        )
    for name, spec in declared.items():
        weights, default = found[name], conditions[name]
        for version, changed in spec.versions.items():
            controlnet = weights.folders.get(f"controlnet{version_mark}{version}")
            if controlnet is None:
                versioned[(name, version)] = None
                continue
            if changed.detector:
                cls = import_class(changed.detector)
                folder = weights.folders.get(f"detector{version_mark}{version}", weights.detector)
                load = lambda cls=cls, folder=folder: cls.from_weights(folder)  # noqa: E731
                check = getattr(cls, "map_problem", None)
            else:
                load, check = (lambda default=default: default.detector), default.map_check
            versioned[(name, version)] = Condition(
                name, load,
                spec.detect_at_resolution if changed.detect_at_resolution is None else changed.detect_at_resolution,
                changed.map_interpolation or spec.map_interpolation, check, controlnet=controlnet,
            )
    return conditions, versioned
