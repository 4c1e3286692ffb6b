"""The controlnet-zimage image through the real Cog server on tiny weights (issue 28, item 8): its schema,
each condition, the ControlNet's effect and scale, the control window, an uploaded map, inpainting, a
per-request LoRA, and the errors a client gets."""

import io

import numpy as np
import pytest
import requests
from PIL import Image

import weights
from cog_base.inputs import ZIMAGE_HEAD, ZIMAGE_TAIL
from scripts.cog_server import CogServer
from tests.conftest import data_uri, drawing, png_bytes, random_lora

FAST = dict(prompt="a cozy house", num_inference_steps=2, width=64, height=48, seed=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cog = CogServer("zimage", log_path=tmp_path_factory.mktemp("cog") / "zimage.log")
    cog.start()
    yield cog
    cog.stop()


@pytest.fixture(scope="module")
def photo() -> str:
    return data_uri(png_bytes(drawing()))


def run(server, **inputs) -> list[np.ndarray]:
    body = server.predict(inputs).json()
    assert body["status"] == "succeeded", body.get("error")
    return [np.asarray(Image.open(io.BytesIO(_bytes(uri))).convert("RGB")).astype(np.int16) for uri in body["output"]]


def _bytes(uri: str) -> bytes:
    import base64

    return base64.b64decode(uri.split(",", 1)[1])


def failed(server, **inputs) -> str:
    response = server.predict(inputs)
    if response.status_code == 422:
        return str(response.json()["detail"])
    body = response.json()
    assert body["status"] == "failed", body
    return body["error"]


def test_the_schema_is_the_zimage_inputs_with_its_defaults(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    inputs = schema["components"]["schemas"]["Input"]
    props = inputs["properties"]
    assert list(props) == [*ZIMAGE_HEAD, *ZIMAGE_TAIL]
    assert sorted(inputs["required"]) == ["image", "prompt"]
    assert schema["components"]["schemas"]["condition"]["enum"] == list(weights.conditions_of("zimage"))
    assert props["num_inference_steps"]["default"] == 8 and props["guidance_scale"]["default"] == 0.0
    assert props["controlnet_conditioning_scale"]["default"] == 0.75
    assert props["width"]["default"] == 0 and "megapixel" in props["width"]["description"]


@pytest.mark.parametrize("condition", weights.conditions_of("zimage"))
def test_each_condition_answers_with_its_map_then_the_sample(server, photo, condition):
    control, sample = run(server, image=photo, condition=condition, **FAST)
    assert control.shape == sample.shape == (48, 64, 3)


def test_the_controlnet_steers_and_its_scale_matters(server, photo):
    default = run(server, image=photo, **FAST)[1]
    assert np.array_equal(default, run(server, image=photo, **FAST)[1])  # same seed, same pixels
    weaker = run(server, image=photo, controlnet_conditioning_scale=0.3, **FAST)[1]
    off = run(server, image=photo, controlnet_conditioning_scale=0.0, **FAST)[1]
    assert not np.array_equal(default, weaker) and not np.array_equal(weaker, off)
    # At scale 0 the control image changes nothing: no ControlNet.
    other = data_uri(png_bytes(drawing().transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    assert np.array_equal(off, run(server, image=other, controlnet_conditioning_scale=0.0, **FAST)[1])
    # A window covering no step (of 2: each begins before 0.9) is no ControlNet either; half of it is neither.
    assert np.array_equal(off, run(server, image=photo, control_guidance_start=0.9, **FAST)[1])
    half = run(server, image=photo, control_guidance_end=0.5, **FAST)[1]
    assert not np.array_equal(half, off) and not np.array_equal(half, default)


def test_an_uploaded_map_is_used_as_is(server, photo):
    control, sample = run(server, image=photo, condition="canny", **FAST)
    as_map = data_uri(png_bytes(Image.fromarray(control.astype(np.uint8))))
    again, same = run(server, image=as_map, condition="canny", control_image_is_map=True, **FAST)
    assert np.array_equal(again, control) and np.array_equal(same, sample)
    (only,) = run(server, image=photo, condition="canny", preprocess_only=True, **FAST)
    assert np.array_equal(only, control)


def test_inpainting_keeps_the_unmasked_pixels(server, photo):
    mask = Image.new("L", (400, 300), 0)
    mask.paste(255, (0, 0, 200, 300))  # the left half regenerates
    inputs = dict(image=photo, mask_image=data_uri(png_bytes(mask)), mask_blur=0, return_control_map=False, **FAST)
    (one,), (two,) = run(server, **inputs), run(server, **dict(inputs, seed=6))
    assert np.array_equal(one[:, 34:], two[:, 34:])  # kept: the photo's own pixels, whatever the seed
    assert not np.array_equal(one[:, :30], two[:, :30])


def test_a_lora_changes_the_output_and_is_unloaded_after(server, photo):
    import torch
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save

    found = weights.locate("zimage", prefer="tiny")
    transformer = ZImageTransformer2DModel.from_pretrained(found.base / "transformer")
    state = random_lora(transformer, "transformer", ("attention.to_q", "attention.to_v"), torch.Generator().manual_seed(0))
    lora = data_uri(save(state), mime="application/octet-stream")
    plain = run(server, image=photo, **FAST)[1]
    styled = run(server, image=photo, lora_url=lora, **FAST)[1]
    assert not np.array_equal(plain, styled)
    assert not np.array_equal(styled, run(server, image=photo, lora_url=lora, lora_scale=0.3, **FAST)[1])
    assert np.array_equal(plain, run(server, image=photo, **FAST)[1])  # unloaded: the base model again
    # An SD 1.5 LoRA (UNet keys) fits no layer of this model: said so, and nothing stays loaded.
    sd = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 32),
          "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(32, 4)}
    message = failed(server, image=photo, lora_url=data_uri(save(sd), mime="application/octet-stream"), **FAST)
    assert "not a LoRA for Z-Image-Turbo" in message and "send a Z-Image-Turbo LoRA" in message
    assert np.array_equal(plain, run(server, image=photo, **FAST)[1])


@pytest.mark.parametrize("inputs, message", [
    (dict(condition="seg"), "condition"),
    (dict(width=4096), "width"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(control_guidance_start=0.6, control_guidance_end=0.4), "control_guidance_start (0.6) must be below"),
    (dict(condition="canny", control_image_is_map=True), "control_image_is_map is on, but"),
    (dict(image_resolution="512"), None),  # an SD 1.5 input: not this image's (no effect, said in the logs)
])
def test_errors_are_clear(server, photo, inputs, message):
    if message is None:
        response = server.predict({"image": photo, **FAST, **inputs})
        assert response.status_code == 200 and response.json()["status"] == "succeeded"
        return
    assert message in failed(server, image=photo, **{**FAST, **inputs})


def test_the_playground_builds_the_zimage_form_and_runs_it(server, tmp_path):
    from tests.test_first_run import CHROMIUM_FLAGS, find_chromium

    if find_chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    from scripts.playground import Playground

    drawing().save(tmp_path / "in.png")
    props = requests.get(f"{server.url}/openapi.json", timeout=10).json()["components"]["schemas"]["Input"]["properties"]
    with Playground(server.url) as page_server, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=find_chromium(),
                                                        headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(page_server.url)
            page.wait_for_selector("#in-prompt")
            assert all(page.locator(f"#in-{name}").count() == 1 for name in props)
            # Its own inputs sit with the basics, open, not folded under More.
            assert page.locator("#in-num_inference_steps").is_visible() and page.locator("#in-condition").is_visible()
            page.set_input_files("#in-image", str(tmp_path / "in.png"))
            page.select_option("#in-condition", "hough")
            page.fill("#in-prompt", "a house")
            page.fill("#in-num_inference_steps", "2")
            page.locator("#in-width").evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", "64")
            page.click("#run")
            page.wait_for_selector("figure img.sample", timeout=300_000)
            assert page.locator("figure img.control").count() == 1 and page.locator("figure img.sample").count() == 1
        finally:
            browser.close()


def test_a_cancel_stops_it_within_the_steps_and_the_server_serves_on(server, photo):
    import re
    import time
    import uuid

    from tests.conftest import Receiver, wait_idle
    from tests.test_serving import post_async

    receiver, prediction_id = Receiver(), uuid.uuid4().hex
    path = f"/hook/{prediction_id}"
    steps = 50
    inputs = dict(image=photo, prompt="a cozy house", num_inference_steps=steps, width=256, height=192, seed=5)
    assert post_async(server, inputs, receiver.url(path), prediction_id=prediction_id).status_code == 202
    deadline = time.monotonic() + 120
    while "step 1/" not in (receiver.for_prediction(path) or [{}])[-1].get("logs", "") and time.monotonic() < deadline:
        time.sleep(0.2)  # denoising has started
    assert requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10).status_code == 200
    final = receiver.wait_final(path, timeout=120)[-1]
    assert final["status"] == "canceled", final.get("error")
    done = [int(n) for n in re.findall(rf"step (\d+)/{steps}", final.get("logs") or "")]
    assert done and max(done) < steps  # stopped inside the loop, not at its end
    wait_idle(server, timeout=60)
    assert run(server, image=photo, **FAST)
