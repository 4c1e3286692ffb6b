"""controlnet_version on the eight images that served a ControlNet 1.0 model: 1.0 stays bit-identical,
1.1 runs its own ControlNet (and its own detector where 1.1 changed it). Tiny weights, plain method;
one image through the real Cog server (test_server.py checks the input is the same in every schema)."""

import functools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import weights
from cog_base.inputs import CONTROLS, JAGILLEY_INPUTS
from scripts import parity_hashes as reference
from tests.conftest import data_uri, decode, drawing, png_bytes, predictor_class, set_up

VERSIONED = ("canny", "depth", "hed", "hough", "normal", "pose", "scribble", "seg")
predictor = functools.cache(set_up)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def upload(tmp_path):
    path = tmp_path / "input.png"
    reference.drawing().save(path)
    return path


def test_the_eight_images_take_controlnet_version_right_before_the_strength_and_no_other_image_does():
    for condition in weights.CONDITIONS:
        cls = predictor_class(condition)
        names = list(cls.fields)
        if condition in VERSIONED:
            assert names[names.index("controlnet_conditioning_scale") - 1] == "controlnet_version", condition
            assert "controlnet_version" not in cls.detector_options(), condition
            assert set(cls.versions) == {"1.1"}, condition
            assert weights.components(condition)["controlnet@1.1"].startswith("control_v11"), condition
        else:
            assert "controlnet_version" not in names and not cls.versions, condition
    assert predictor_class("pose").extra_inputs == ("detect_resolution", "pose_hands_face", "controlnet_version")


@pytest.mark.parametrize("condition", VERSIONED)
def test_version_10_is_bit_identical_and_11_runs_its_own_controlnet_on_first_use(condition, upload, parity_reference):
    p = predictor(condition)
    folder = p.weights.folders["controlnet@1.1"]
    with reference.one_thread():
        explicit = [reference.pixel_hash(f) for f in p.generate(image=upload, controlnet_version="1.0", **reference.FAST)]
        assert explicit == parity_reference[0][condition]["defaults"]  # the parity reference: today's outputs
        assert folder not in p.runner.controlnets.loaded  # a 1.0 request never loads the 1.1 model
        newer = p.generate(image=upload, controlnet_version="1.1", **reference.FAST)
    assert folder in p.runner.controlnets.loaded
    assert [reference.pixel_hash(f) for f in newer][1:] != explicit[1:]  # the samples change
    assert pixels(newer[1]).shape == (256, 320, 3)


def test_the_11_maps_follow_its_demos(upload):
    canny = predictor("canny")
    old, new = (pixels(canny.generate(image=upload, controlnet_version=v, preprocess_only=True, **reference.FAST)[0])
                for v in ("1.0", "1.1"))
    assert set(np.unique(old)) <= {0, 255}
    # 1.1 ran Canny at detect resolution (512) and resized the map bilinearly: grey edge pixels.
    assert old.shape == new.shape and len(np.unique(new)) > 2
    normal = predictor("normal")
    midas, bae = (pixels(normal.generate(image=upload, controlnet_version=v, preprocess_only=True, **reference.FAST)[0])
                  for v in ("1.0", "1.1"))
    assert midas.shape == bae.shape == (256, 320, 3) and not np.array_equal(midas, bae)
    with pytest.raises(ValueError, match="bg_threshold does not apply to controlnet_version 1.1"):
        normal.generate(image=upload, controlnet_version="1.1", bg_threshold=0.4, **reference.FAST)
    with pytest.raises(ValueError, match="controlnet_version must be one of 1.0, 1.1"):
        normal.generate(image=upload, controlnet_version="2", **reference.FAST)


def test_an_uploaded_map_is_checked_as_for_10_and_used_as_is(upload, tmp_path):
    p = predictor("canny")
    with pytest.raises(ValueError, match="control_image_is_map is on, but .*Send a canny map"):
        p.generate(image=upload, controlnet_version="1.1", control_image_is_map=True, **reference.FAST)
    edges = np.zeros((256, 320, 3), np.uint8)
    edges[100:104, 20:300] = 255
    Image.fromarray(edges).save(tmp_path / "map.png")
    files = p.generate(image=tmp_path / "map.png", controlnet_version="1.1", control_image_is_map=True,
                       **reference.FAST)
    np.testing.assert_array_equal(pixels(files[0]), edges)
    assert len(files) == 2


def test_an_image_whose_weights_lack_the_11_model_serves_10_and_says_what_is_missing(upload, tmp_path, monkeypatch):
    tiny = weights.root() / weights.TINY
    monkeypatch.setenv("CONTROLNET_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / weights.TINY).mkdir()
    for role, name in weights.components("hough").items():
        if role != "controlnet@1.1":  # weights made before 1.1 was added
            (tmp_path / weights.TINY / name).symlink_to(tiny / name)
    found = weights.locate("hough")
    assert "controlnet@1.1" not in found.folders and found.controlnet.name == "sd-controlnet-mlsd"
    p = predictor_class("hough")()
    p.setup()
    assert len(p.generate(image=upload, **reference.FAST)) == 2
    with pytest.raises(ValueError, match="controlnet_version 1.1 is not available on this server: .*make weights COND=hough"):
        p.generate(image=upload, controlnet_version="1.1", **reference.FAST)
    # What the operator is told must fix it: make weights skips a component that has no pinned revision.
    name = weights.components("hough")["controlnet@1.1"]
    spec = weights.MANIFEST["components"][name]
    for revision in (None, "0" * 40):
        monkeypatch.setitem(spec, "revision", revision)
        with pytest.raises(ValueError) as error:
            p.generate(image=upload, controlnet_version="1.1", **reference.FAST)
        if revision is None:
            assert f"pins a commit of {spec['repo']} as its revision in weights/manifest.json" in str(error.value)
        else:
            assert "weights/manifest.json" not in str(error.value)
        assert "then runs `make weights COND=hough`" in str(error.value) or revision is not None
        assert "make weights COND=hough" in str(error.value)


# The revisions found for the last three 1.1 repos (../shared/notes/controlnet-11-multi-editing.md, "Pinned
# revisions"), with the fp16 files' sha256 where a page showed it whole.
PINNED_11 = {
    "hough": ("control_v11p_sd15_mlsd", "f6d481b1e7346b5067de10288329e64cb4d39537",
              "7ffedf5319792a7ae36209529170bea7bcb76a3cdd2390d35609ccf670814c2e"),
    "scribble": ("control_v11p_sd15_scribble", "3564ec7b87dd706d5fc760d21c9e90bb160d1e9f", None),
    "seg": ("control_v11p_sd15_seg", "210682041b41097834006a910b8773f423343900",
            "23809d298edb48bf97ce95c6b8c4a69a749e57bf3838d866fbdc45f8fa11f6f4"),
}
FP16 = "diffusion_pytorch_model.fp16.safetensors"


def test_every_versioned_image_has_its_11_controlnet_pinned_as_an_fp16_download():
    for condition in VERSIONED:
        name = weights.components(condition)["controlnet@1.1"]
        spec = weights.MANIFEST["components"][name]
        assert spec["revision"] and "unpinned" not in spec, condition
        assert spec["files"] == ["config.json", FP16], condition
    for condition, (name, revision, digest) in PINNED_11.items():
        spec = weights.MANIFEST["components"][name]
        assert (weights.components(condition)["controlnet@1.1"], spec["revision"]) == (name, revision)
        assert spec.get("sha256", {}) == ({FP16: digest} if digest else {})


@pytest.mark.parametrize("condition", sorted(PINNED_11))
def test_make_weights_fetches_the_pinned_11_controlnet_and_checks_its_digest(condition, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from weights import download

    name, revision, digest = PINNED_11[condition]
    calls = []

    def snapshot_download(repo_id, revision, allow_patterns, local_dir):
        calls.append((repo_id, revision, allow_patterns))
        for rel in allow_patterns:
            (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / rel).write_bytes(b"not the real bytes")
        return str(local_dir)

    monkeypatch.setenv("CONTROLNET_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(download, "check_reachable", lambda url, what: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for other in weights.components(condition).values():  # everything but the 1.1 ControlNet is there already
        if other != name:
            (tmp_path / other).mkdir(exist_ok=True)
            weights.write_marker(tmp_path / other, revision=weights.revision(other),
                                 files=weights.MANIFEST["components"][other].get("files"))
    if digest:  # other bytes than the pinned file's: refused, and the folder is not marked complete
        with pytest.raises(SystemExit, match=f"{FP16} .*do not have the manifest's sha256"):
            download.main([condition])
        assert weights.marker(tmp_path / name) is None
    else:
        download.main([condition])
        assert weights.is_complete(tmp_path / name, name, tiny=False)
    assert calls == [(f"lllyasviel/{name}", revision, ["config.json", FP16])]
    assert "NOT downloaded" not in capsys.readouterr().out


@pytest.mark.parametrize("condition", sorted(PINNED_11))
def test_the_newly_pinned_images_serve_11_with_its_own_controlnet(condition, upload):
    """Apart from the parity fixture (which pins the 1.0 outputs of one CPU): a 1.1 request loads and runs the
    1.1 ControlNet, stored as the fp16 file its pinned download is."""
    p = predictor(condition)
    folder = p.weights.folders["controlnet@1.1"]
    assert folder.name == PINNED_11[condition][0] and (folder / FP16).is_file()
    with reference.one_thread():
        older = [reference.pixel_hash(f) for f in p.generate(image=upload, controlnet_version="1.0", **reference.FAST)]
        newer = [reference.pixel_hash(f) for f in p.generate(image=upload, controlnet_version="1.1", **reference.FAST)]
    assert folder in p.runner.controlnets.loaded and newer[1:] != older[1:]


def test_a_component_without_a_pinned_revision_is_skipped_by_make_weights_with_the_reason(tmp_path, monkeypatch, capsys):
    from weights import download

    name = "control_v11p_sd15_scribble"
    monkeypatch.setitem(weights.MANIFEST["components"], name,
                        {**weights.MANIFEST["components"][name], "revision": None, "unpinned": "no commit found"})
    download.download_component(name, tmp_path / name)  # no network touched: refused before
    assert "NOT downloaded" in capsys.readouterr().out and not (tmp_path / name).exists()


def test_the_11_tiny_controlnets_have_the_downloads_layout():
    for condition in VERSIONED:
        folder = weights.locate(condition, prefer="tiny").folders["controlnet@1.1"]
        assert (folder / FP16).is_file() and not (folder / "diffusion_pytorch_model.safetensors").exists(), condition


# -- the detectors 1.1 adds ---------------------------------------------------------------------------

def test_normalbae_map_matches_controlnet_aux_on_the_same_input():
    from controlnet_aux.normalbae import NormalBaeDetector as Aux

    from models.detectors.normalbae import NormalBaeDetector

    ours = NormalBaeDetector.from_weights(weights.locate("normal").folders["detector@1.1"])
    rgb = np.asarray(drawing(256, 192))
    got = ours(rgb)
    expected = Aux(ours.network)(rgb, detect_resolution=192, image_resolution=192, output_type="np")
    assert got.shape == (192, 256, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.std() and got.min() >= 0 and got.max() <= 255


def test_normalbae_loader_builds_controlnet_aux_network_at_the_real_widths():
    from controlnet_aux.normalbae.nets.NNET import NNET

    from models.detectors.normalbae import ARGS, _quietly, network

    with torch.device("meta"):
        real = _quietly(lambda: NNET(ARGS))
    built = network(real.state_dict())  # shapes only: meta tensors
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert [type(m).__name__ for m in built.modules()] == [type(m).__name__ for m in real.modules()]
    depthwise = [m for m in built.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


class _OnePerson:
    """A body network that finds one person, standing (the tiny one finds nobody)."""

    model = None
    points = [(128, 40), (128, 70), (100, 70), (90, 110), (85, 150), (156, 70), (166, 110), (171, 150), (110, 150),
              (110, 200), (110, 240), (146, 150), (146, 200), (146, 240), (120, 35), (136, 35), (112, 40), (144, 40)]

    def __call__(self, bgr):
        candidate = np.array([[x, y, 1.0, i] for i, (x, y) in enumerate(self.points)])
        return candidate, np.array([list(range(18)) + [18.0, 18]])


def test_pose_hands_and_face_change_the_map_and_11_draws_the_body_its_way():
    from models.detectors.pose import PoseDetector

    detector = PoseDetector.from_weights(weights.locate("pose").detector)
    detector.body = _OnePerson()
    canvas = np.full((256, 256, 3), 128, np.uint8)
    body = detector(canvas)
    assert detector._hand is None  # hands and face load when first asked for
    full = detector(canvas, pose_hands_face=True)
    assert np.any(full != body)
    white = lambda m: np.all(m == 255, axis=2).any()  # noqa: E731  face keypoints; no body colour is white
    assert white(full) and not white(body)
    assert np.any(detector(canvas, drawing="1.1") != body)
    # The pose image passes both through: its own option, and 1.1's drawing with its version.
    assert predictor_class("pose").versions["1.1"].fixed_options == {"drawing": "1.1"}


# -- the real Cog server --------------------------------------------------------------------------------

def test_normal_serves_both_versions_through_the_cog_server(tmp_path):
    from scripts.cog_server import CogServer
    from tests.test_server import GOOD, schema_inputs

    start = time.monotonic()
    with CogServer("normal", log_path=tmp_path / "normal.log") as server:
        print(f"normal: READY after {time.monotonic() - start:.0f}s", flush=True)
        schema, inputs = schema_inputs(server)
        props = inputs["properties"]
        assert list(props) == [*JAGILLEY_INPUTS, *predictor_class("normal").extra_inputs, *CONTROLS]
        assert props["controlnet_version"]["default"] == "1.0"
        assert schema["components"]["schemas"]["controlnet_version"]["enum"] == ["1.0", "1.1"]
        outputs = {}
        for version in ("1.0", "1.1"):
            body = server.predict({"image": data_uri(png_bytes(drawing())), **GOOD, "controlnet_version": version}).json()
            assert body["status"] == "succeeded", body.get("error")
            outputs[version] = [np.asarray(decode(uri).convert("RGB")) for uri in body["output"]]
            assert [o.shape for o in outputs[version]] == [(256, 320, 3)] * 2
        assert not np.array_equal(outputs["1.0"][0], outputs["1.1"][0])  # MiDaS normals vs NormalBAE's
        assert "loaded ControlNet control_v11p_sd15_normalbae" in body["logs"]
        assert server.predict({"image": data_uri(png_bytes(drawing())), "prompt": "x",
                               "controlnet_version": "1.2"}).status_code == 422
    print(f"normal: done after {time.monotonic() - start:.0f}s", flush=True)
