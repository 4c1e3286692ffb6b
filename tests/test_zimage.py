"""Z-Image-Turbo + Fun ControlNet Union 2.1 (issue 28's model code): the ControlNet loads from its original
single file through diffusers' detection and conversion, other files are refused by name, the control
window behaves as on SD 1.5 (the full window changes nothing, an empty one is no ControlNet), sizes follow
the model's multiples. Tiny random weights in the real layout, CPU."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import zimage
from weights import tiny_zimage

STEPS = 3
SIZE = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage")
    tiny_zimage.write_base(root / "base")
    return root / "base", tiny_zimage.write_controlnet(root / "controlnet")


@pytest.fixture(scope="module")
def pipe(tiny):
    base, file = tiny
    return zimage.load_pipeline(base, zimage.load_controlnet(file, file.parent))


@pytest.fixture(scope="module")
def control():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def generate(pipe, control, **kwargs):
    kwargs = dict(dict(prompt="a cozy house", height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=0.0,
                       control_image=control, output_type="np"), **kwargs)
    return pipe(generator=torch.Generator().manual_seed(7), **kwargs).images


def test_the_written_architecture_is_the_real_files():
    from diffusers import ZImageControlNetModel

    config = {k: v for k, v in zimage.CONTROLNET_21_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        state = ZImageControlNetModel(**config).state_dict()
    # The pinned 2.1 file: 295 tensors, 3,356,225,792 parameters (6,712,485,600 bytes of bf16 with its header).
    assert len(state) == 295
    assert sum(t.numel() for t in state.values()) == 3_356_225_792


def test_the_tiny_file_is_detected_as_21_and_converted(tiny, pipe):
    _, file = tiny
    assert zimage.controlnet_version(file) == zimage.CONTROLNET_VERSION
    # Bound to the transformer: the ControlNet runs on the base's own embedders and refiners.
    assert pipe.controlnet.noise_refiner is pipe.transformer.noise_refiner
    assert len(pipe.controlnet.control_layers) == 15


def test_other_files_are_refused_by_what_they_are(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, file = tiny
    state = load_file(str(file))
    state["control_noise_refiner.0.before_proj.weight"] = torch.zeros_like(state["control_noise_refiner.0.before_proj.weight"])
    older = tmp_path / "older.safetensors"
    save_file(state, str(older))
    with pytest.raises(zimage.ZImageWeightsError, match="is z-image-turbo-controlnet-2.0, not the Fun ControlNet Union 2.1"):
        zimage.load_controlnet(older, file.parent)
    other = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.ones(2)}, str(other))
    with pytest.raises(zimage.ZImageWeightsError, match="is not a Z-Image-Turbo ControlNet"):
        zimage.load_controlnet(other, file.parent)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(zimage.ZImageWeightsError, match="broken.safetensors is not a readable .safetensors file"):
        zimage.load_controlnet(broken, file.parent)


def test_the_controlnet_and_its_scale_change_the_output(pipe, control):
    default = generate(pipe, control)
    assert default.shape == (1, SIZE, SIZE, 3) and np.isfinite(default).all()
    assert np.array_equal(default, generate(pipe, control))  # same seed, same pixels
    off = generate(pipe, control, controlnet_conditioning_scale=0.0)
    weaker = generate(pipe, control, controlnet_conditioning_scale=0.3)
    assert not np.array_equal(default, off) and not np.array_equal(default, weaker) and not np.array_equal(weaker, off)
    flipped = generate(pipe, control.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert not np.array_equal(default, flipped)  # the control image itself steers


def test_the_control_window(pipe, control):
    plain = generate(pipe, control)
    with zimage.control_window(pipe, 0.0, 1.0):
        assert np.array_equal(generate(pipe, control), plain)  # the default window: diffusers' own pipeline
    with zimage.control_window(pipe, 1.0, 1.0):
        empty = generate(pipe, control)
    assert np.array_equal(empty, generate(pipe, control, controlnet_conditioning_scale=0.0))  # no step: no ControlNet
    with zimage.control_window(pipe, 0.0, 0.5):
        half = generate(pipe, control)
    assert not np.array_equal(half, plain) and not np.array_equal(half, empty)
    assert np.array_equal(generate(pipe, control), plain)  # the block leaves the pipeline as it was


def test_the_window_is_restored_when_the_call_fails(pipe):
    with pytest.raises(RuntimeError, match="boom"):
        with zimage.control_window(pipe, 0.2, 0.6):
            raise RuntimeError("boom")
    assert "forward" not in vars(pipe.controlnet)


def test_kept_steps_follow_diffusers_rule():
    # The note's figure: 8 steps ending at 0.8 keep steps 0-5, as SD's ControlNets do.
    assert zimage.kept_steps(8, 0.0, 0.8) == [True] * 6 + [False] * 2
    assert zimage.kept_steps(4, 0.25, 1.0) == [False, True, True, True]
    assert not any(zimage.kept_steps(8, 1.0, 1.0))


@pytest.mark.parametrize("height, width", [(1024, 1024), (3000, 4000), (600, 2400), (1, 1)])
def test_sizes_are_about_a_megapixel_in_the_models_multiples(height, width):
    h, w = zimage.plan_size(height, width)
    assert h % 16 == 0 and w % 16 == 0
    if height > 1:
        assert abs(h * w / 2**20 - 1) < 0.05
        assert abs((w / h) / (width / height) - 1) < 0.05
    with pytest.raises(ValueError, match="has no aspect"):
        zimage.plan_size(0, 10)


def test_inpainting_shares_the_modules(pipe):
    inpaint = zimage.inpaint_pipeline(pipe)
    assert inpaint.transformer is pipe.transformer and inpaint.controlnet is pipe.controlnet and inpaint.vae is pipe.vae


def test_the_runner_takes_the_sd15_runners_units_and_request(pipe, control):
    from models.control import ControlUnit
    from models.pipeline import Request

    lines = []
    runner = zimage.ZImageRunner(pipe, log=lines.append)
    unit = ControlUnit(None, map=np.asarray(control), strength=0.75)
    request = Request(prompt="a cozy house", num_samples=2, steps=STEPS, guidance_scale=0.0, seed=7)
    result = runner.generate([unit], request)
    assert [img.size for img in result.samples] == [(SIZE, SIZE)] * 2
    again = runner.generate([unit], request)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.samples, again.samples))
    assert lines[0].startswith("step 1/3") and lines[-1].startswith("step 3/3")
    # Guidance above 0 reads the negative prompt; at 0 the pipeline runs without one.
    guided = [Request(prompt="a cozy house", negative_prompt=n, steps=STEPS, guidance_scale=2.0, seed=7) for n in ("", "dark")]
    plain, negative = (np.asarray(runner.generate([unit], r).samples[0]) for r in guided)
    assert not np.array_equal(plain, negative)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[: SIZE // 2] = True
    photo = np.full((SIZE, SIZE, 3), 200, np.uint8)
    inpainted = runner.generate([unit], Request(prompt="a cozy house", steps=STEPS, guidance_scale=0.0, seed=7,
                                                init_image=photo, mask=mask))
    assert inpainted.samples[0].size == (SIZE, SIZE)
    assert not np.array_equal(np.asarray(inpainted.samples[0]), np.asarray(result.samples[0]))
    with pytest.raises(ValueError, match="img2img is not served with Z-Image-Turbo"):
        runner.generate([unit], Request(prompt="a", steps=STEPS, seed=7, init_image=photo))


# -- its weights: the manifest's family, the real layout, the download's config --------------------------

def test_the_zimage_image_is_a_family_with_its_own_base_controlnet_and_our_detectors():
    import weights

    assert "zimage" in weights.IMAGES and "zimage" not in weights.CONDITIONS
    assert weights.conditions_of("zimage") == ("canny", "depth", "hed", "hough", "pose")
    roles = weights.components("zimage")
    assert roles["base"] == "z-image-turbo" and roles["controlnet"] == "z-image-turbo-fun-controlnet-union-2.1"
    # Each condition's own detector (canny has none: OpenCV), at its default version.
    assert {r for r in roles if r.endswith(".detector")} == {"depth.detector", "hed.detector", "hough.detector",
                                                            "pose.detector"}
    assert roles["depth.detector"] == weights.components("depth")["detector"]
    found = weights.locate("zimage", prefer="tiny")
    assert found.of("canny").folders == {"base": found.base}  # served, with no folder of its own
    assert found.of("pose").detector == found.folders["pose.detector"]
    with pytest.raises(ValueError, match="serves no condition 'seg'"):
        found.of("seg")


def test_the_tiny_weights_are_the_real_layout(tiny_weights):
    import json

    import weights

    found = weights.locate("zimage", prefer="tiny")
    index = json.loads((found.base / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"] and index["vae"][1] == "AutoencoderKL"
    spec = weights.MANIFEST["components"]["z-image-turbo-fun-controlnet-union-2.1"]
    (file,) = spec["files"]
    assert zimage.controlnet_version(found.controlnet / file) == zimage.CONTROLNET_VERSION


def test_the_download_writes_the_converters_config_beside_the_file(tmp_path, monkeypatch):
    import json

    import huggingface_hub

    import weights
    import weights.download as download

    name = "z-image-turbo-fun-controlnet-union-2.1"
    spec = weights.MANIFEST["components"][name]
    monkeypatch.setattr(download, "check_reachable", lambda url, what: None)
    monkeypatch.setattr(download, "check_digests", lambda *args: None)  # the stand-in's bytes are not the file's

    def snapshot_download(repo_id, revision, allow_patterns, local_dir):
        assert (repo_id, revision) == (spec["repo"], spec["revision"])
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for rel in allow_patterns:
            (Path(local_dir) / rel).write_text("the file")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    download.download_component(name, tmp_path / name)
    assert json.loads((tmp_path / name / "config.json").read_text()) == zimage.CONTROLNET_21_CONFIG
    assert weights.is_complete(tmp_path / name, name, tiny=False)


def test_the_benchmarks_full_size_model_is_z_image_turbos(tmp_path):
    """bench/zimage.py builds the real architectures (on the meta device here: no memory): Z-Image-Turbo's
    6.15 B transformer, the 2.1 file's 3,356 M ControlNet, Qwen3-4B and the 84 M VAE, 27 GB in bf16."""
    from bench import zimage as bench_zimage

    pipe = bench_zimage.build_full("meta", tmp_path)
    counts = bench_zimage.params_m(pipe)
    assert counts["controlnet"] == 3356.2
    assert 6100 < counts["transformer"] < 6200 and 4000 < counts["text_encoder"] < 4050 and 80 < counts["vae"] < 90
    assert pipe.transformer.dtype == torch.bfloat16


def test_the_largest_sides_run_on_the_tiny_model(pipe):
    """The tiny transformer has positions for the largest width/height (2048 px: 128 patches a side); with
    fewer, the served default of about a megapixel (1152x912 for a 5:4 upload) failed with an IndexError."""
    assert pipe.transformer.config.axes_lens[1:] == [128, 128]
    height, width = zimage.plan_size(256, 320)
    assert (height, width) == (912, 1152)
    control = Image.new("RGB", (width, height), "white")
    out = pipe(prompt="a house", height=height, width=width, num_inference_steps=1, guidance_scale=0.0,
               control_image=control, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, height, width, 3)
