"""Every condition's predictor through the plain method, on tiny weights (no HTTP)."""

import importlib

import cv2
import numpy as np
import pytest
from PIL import Image

import weights
from cog_base import ControlNetPredictor, Inputs
from models.image import resize_to_resolution
from tests.conftest import predictor_class

FAST = dict(ddim_steps=1, image_resolution="256", seed=3)


@pytest.fixture(scope="module", params=weights.CONDITIONS)
def predictor(request):
    p = predictor_class(request.param)()
    p.setup()
    return p


def with_hole(path):
    """The drawing with a transparent corner: composited onto white by most conditions, repainted by inpaint."""
    rgba = np.asarray(Image.open(path).convert("RGBA")).copy()
    rgba[: rgba.shape[0] // 2, : rgba.shape[1] // 2, 3] = 0
    Image.fromarray(rgba).save(path)
    return path


def test_every_condition_returns_its_map_then_the_samples(predictor, image_file):
    files = predictor.generate(with_hole(image_file()), "a house", num_samples="4", **FAST)
    assert len(files) == 5
    sizes = {Image.open(f).size for f in files}
    assert sizes == {(320, 256)}
    control = np.asarray(Image.open(files[0]))
    # RGB, or RGBA for a map that marks masked pixels (inpaint)
    assert control.shape[:2] == (256, 320) and control.shape[2] in (3, 4) and control.dtype == np.uint8


def test_the_detector_component_is_the_one_its_class_writes(predictor):
    roles = weights.components(predictor.condition)
    if "detector" in roles:
        spec = weights.MANIFEST["components"][roles["detector"]]
        module, _, cls = spec["random"].partition(":")
        # A component two conditions share (MiDaS for depth and normal) is written by their common base.
        assert issubclass(predictor.detector_class(), getattr(importlib.import_module(module), cls))
        assert predictor.weights.detector.name == roles["detector"]
    else:
        assert predictor.weights.detector is None


def test_nearest_resized_maps_keep_only_detector_values(predictor, image_file):
    if predictor.map_interpolation != "nearest":
        pytest.skip("bilinear map")
    rgb = np.asarray(Image.open(image_file()).convert("RGB"))
    control = predictor.runner.control_map(rgb, (256, 320), 384)  # detect at a size unlike the sample's
    detected = predictor.runner.detector(resize_to_resolution(rgb, 384))
    assert {tuple(c) for c in control.reshape(-1, 3)} <= {tuple(c) for c in detected.reshape(-1, 3)}


def test_scribble_thresholds_the_drawing_at_the_sample_size(image_file):
    p = predictor_class("scribble")()
    p.setup()
    img = np.full((300, 400, 3), 255, np.uint8)
    cv2.line(img, (20, 20), (380, 280), (0, 0, 0), 9)
    path = image_file()
    Image.fromarray(img).save(path)
    control = np.asarray(Image.open(p.generate(path, "x", **FAST)[0]))
    resized = cv2.resize(img, (320, 256), interpolation=cv2.INTER_AREA)
    expected = np.where(resized.min(axis=2) < 127, 255, 0)
    np.testing.assert_array_equal(control[..., 0], expected)


def test_a_predict_signature_out_of_the_shared_order_is_refused():
    with pytest.raises(TypeError, match="must take"):
        class Broken(ControlNetPredictor):
            def predict(self, image=Inputs.image, prompt=Inputs.prompt):
                pass


def test_an_input_defined_outside_the_registry_is_refused():
    from cog import Input

    with pytest.raises(TypeError, match="define every Input in cog_base.inputs.Inputs"):
        class Local(ControlNetPredictor):
            def predict(self, image=Inputs.image, prompt=Input(description="mine")):
                pass
    with pytest.raises(TypeError, match="prompt must default to Inputs.prompt, not Inputs.a_prompt"):
        class Swapped(ControlNetPredictor):
            def predict(self, image=Inputs.image, prompt=Inputs.a_prompt):
                pass


def test_extra_inputs_are_read_from_the_signature():
    assert predictor_class("canny").extra_inputs == ("low_threshold", "high_threshold", "controlnet_version")
    assert predictor_class("canny").detector_options() == ("low_threshold", "high_threshold")
    assert predictor_class("scribble").extra_inputs == ("controlnet_version",)
    assert predictor_class("lineart").extra_inputs == ("detect_resolution", "lineart_preprocessor")
    assert predictor_class("softedge").extra_inputs == ("detect_resolution", "softedge_preprocessor")
    assert predictor_class("inpaint").extra_inputs == ()
