"""Editing (#20): img2img and inpainting with ControlNet, on tiny weights. Most behaviour goes through the
plain generate(); the real Cog servers of the session (conftest `servers`) cover the HTTP side."""

import base64

import cv2
import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save

from models.image import resize_to
from models.pipeline import SCHEDULERS, EditRefusedError, Request, _client_terms
from tests.conftest import data_uri, decode, drawing, png_bytes, predictor_class, random_lora

# Small uploads returned at their own size (generated at 128x128), 2 steps: strength 0.8 runs 1 of them.
W, H = 160, 120
FAST = dict(prompt="a house", image_resolution="256", ddim_steps=2, seed=11, width=W, height=H)
BOX = (40, 30, 100, 80)  # the masked rectangle of a W x H upload


@pytest.fixture(scope="module")
def canny():
    p = predictor_class("canny")()
    p.setup()
    return p


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The upload, another photo to start from, and masks, as files."""
    folder = tmp_path_factory.mktemp("edit")
    paths = {"image": folder / "image.png", "init": folder / "init.png"}
    drawing(W, H).save(paths["image"])
    drawing(W, H).transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(7).save(paths["init"])
    for name, size, box, fill in [
        ("mask", (W, H), BOX, 255), ("half", (W // 2, H // 2), tuple(v // 2 for v in BOX), 255),
        ("black", (W, H), None, 0), ("grey127", (W, H), (0, 0, W, H), 127), ("grey128", (W, H), (0, 0, W, H), 128),
        # 5:3: the 4:3 request keeps its middle W columns, and this white strip is left of them
        ("cropped-away", (W * 5 // 4, H), (0, 0, 15, H), 255),
    ]:
        mask = Image.new("L", size, 0)
        if box:
            ImageDraw.Draw(mask).rectangle(box, fill=fill)
        paths[name] = folder / f"{name}.png"
        mask.save(paths[name])
    # 5:1, past the 4:1 that `image` has: the crop to the upload's 4:3 would keep a fifth of it.
    Image.new("RGB", (500, 100), "white").save(folder / "strip.png")
    paths["strip"] = folder / "strip.png"
    paths["not-an-image"] = folder / "notes.txt"
    paths["not-an-image"].write_text("hello")
    return paths


def sample(predictor, image, **kwargs) -> np.ndarray:
    return np.asarray(Image.open(predictor.generate(image, **(FAST | kwargs))[-1])).astype(np.int16)


def differs(a, b, by=0.5) -> bool:
    return a.shape != b.shape or float(np.abs(a - b).mean()) > by


def outside(mask_path, blur, size=None) -> np.ndarray:
    """The pixels farther than `blur` from the mask's white area (at `size`): those the composite keeps."""
    mask = np.asarray(Image.open(mask_path))
    if size:
        mask = resize_to(mask, *size)
    white = (mask >= 128).astype(np.uint8)
    return cv2.dilate(white, np.ones((2 * blur + 1, 2 * blur + 1), np.uint8)) == 0


# -- modes, strength, seeds ---------------------------------------------------------------------------


def test_each_mode_changes_the_output_and_strength_changes_it(canny, files):
    txt2img = sample(canny, files["image"])
    img2img = sample(canny, files["image"], init_image=files["init"])
    inpaint = sample(canny, files["image"], mask_image=files["mask"])
    stronger = sample(canny, files["image"], init_image=files["init"], strength=1.0)
    assert differs(img2img, txt2img) and differs(inpaint, txt2img) and differs(inpaint, img2img)
    assert differs(stronger, img2img)
    # what img2img starts from shows in its output: another photo, another image
    assert differs(sample(canny, files["image"], init_image=files["image"]), img2img)


def test_same_seed_same_image_other_seed_another(canny, files):
    for edit in (dict(init_image=files["init"]), dict(mask_image=files["mask"])):
        first = sample(canny, files["image"], **edit)
        np.testing.assert_array_equal(first, sample(canny, files["image"], **edit))
        assert differs(first, sample(canny, files["image"], **edit, seed=12))


def test_strength_and_mask_blur_alone_change_nothing(canny, files):
    np.testing.assert_array_equal(sample(canny, files["image"]),
                                  sample(canny, files["image"], strength=0.3, mask_blur=9))


# -- inpainting keeps what it must keep ---------------------------------------------------------------


def test_inpaint_keeps_every_pixel_outside_the_feathered_mask_exactly(canny, files):
    upload = np.asarray(Image.open(files["image"])).astype(np.int16)
    for blur in (0, 4, 10):
        got = sample(canny, files["image"], mask_image=files["mask"], mask_blur=blur)
        keep = outside(files["mask"], blur)
        np.testing.assert_array_equal(got[keep], upload[keep])
        white = np.asarray(Image.open(files["mask"])) >= 128
        assert differs(got[white], upload[white], by=5)
    # wider feathering blends in pixels a hard edge keeps
    hard = sample(canny, files["image"], mask_image=files["mask"], mask_blur=0)
    soft = sample(canny, files["image"], mask_image=files["mask"], mask_blur=10)
    ring = outside(files["mask"], 0) & ~outside(files["mask"], 10)
    assert differs(soft[ring], hard[ring], by=0.2)


def test_inpaint_keeps_the_resized_input_at_the_returned_size(canny, files):
    """The size plan's sizes: the returned size (200x150, generated at 192x128), the upload resized to it; and
    jagilley's sizing (image_resolution: 341x256 rounded to 320x256)."""
    got = sample(canny, files["image"], mask_image=files["mask"], width=200, height=150)
    assert got.shape == (150, 200, 3)
    upload = resize_to(np.asarray(Image.open(files["image"])), 150, 200).astype(np.int16)
    keep = outside(files["mask"], 4, size=(150, 200))
    np.testing.assert_array_equal(got[keep], upload[keep])
    got = sample(canny, files["image"], mask_image=files["mask"], width=0, height=0)
    assert got.shape == (256, 320, 3)
    upload = resize_to(np.asarray(Image.open(files["image"])), 256, 320).astype(np.int16)
    keep = outside(files["mask"], 4, size=(256, 320))
    np.testing.assert_array_equal(got[keep], upload[keep])


def test_a_mask_with_init_image_inpaints_the_init_image(canny, files):
    got = sample(canny, files["image"], init_image=files["init"], mask_image=files["mask"])
    init = np.asarray(Image.open(files["init"])).astype(np.int16)
    keep = outside(files["mask"], 4)
    np.testing.assert_array_equal(got[keep], init[keep])


def test_a_mask_of_another_size_follows_the_size_plan(canny, files):
    """A half-size mask of the same aspect is scaled up; one of another aspect is centre-cropped first."""
    upload = np.asarray(Image.open(files["image"])).astype(np.int16)
    got = sample(canny, files["image"], mask_image=files["half"])
    keep = outside(files["mask"], 7)
    np.testing.assert_array_equal(got[keep], upload[keep])
    with pytest.raises(ValueError, match="mask_image has nothing to regenerate"):
        canny.generate(files["image"], **FAST, mask_image=files["cropped-away"])


def test_a_grey_mask_is_white_from_128(canny, files):
    with pytest.raises(ValueError, match="nothing to regenerate"):
        canny.generate(files["image"], **FAST, mask_image=files["grey127"])
    whole = sample(canny, files["image"], mask_image=files["grey128"])
    assert differs(whole, np.asarray(Image.open(files["image"])).astype(np.int16), by=5)


@pytest.mark.parametrize("inputs, message", [
    (dict(mask_image="black"), "mask_image has nothing to regenerate: it is all black"),
    (dict(mask_image="not-an-image"), "mask_image: image could not be decoded"),
    (dict(init_image="not-an-image"), "init_image: image could not be decoded"),
    (dict(init_image="strip"), "^init_image aspect ratio 5.0:1 is too extreme; crop it to at most 4:1"),
    (dict(mask_image="strip"), "^mask_image aspect ratio 5.0:1 is too extreme; crop it to at most 4:1"),
    (dict(init_image="init", strength=0.1), "strength 0.1 of ddim_steps 2 runs no denoising step"),
    (dict(mask_image="mask", strength=0.0), "raise strength \\(above 0\\) or ddim_steps"),
    (dict(init_image="init", strength=1.5), "strength must be between 0.0 and 1.0"),
    (dict(mask_image="mask", mask_blur=-1), "mask_blur must be between 0 and 64"),
])
def test_bad_edit_inputs_say_what_to_send(canny, files, inputs, message):
    inputs = {k: files[v] if isinstance(v, str) else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match=message):
        canny.generate(files["image"], **FAST, **inputs)


# -- one set of weights, our own controls, the client's terms ------------------------------------------


def test_the_edit_pipelines_share_the_loaded_modules(canny, files):
    sample(canny, files["image"], init_image=files["init"])
    sample(canny, files["image"], mask_image=files["mask"])
    pipe = canny.runner.pipe
    for mode in ("img2img", "inpaint"):
        edit = canny.runner.pipeline_for(mode)
        for name in ("unet", "vae", "text_encoder", "tokenizer", "controlnet"):
            assert getattr(edit, name) is getattr(pipe, name), (mode, name)
    # a module replaced on the loaded pipeline after loading (compiled, patched) is the one used
    unet = pipe.unet
    try:
        pipe.unet = torch.nn.Module()
        assert canny.runner.pipeline_for("img2img").unet is pipe.unet
    finally:
        pipe.unet = unet
    assert canny.runner.pipeline_for("img2img").unet is unet


def test_our_conditioning_scale_reaches_every_mode(canny, files, monkeypatch):
    """diffusers' img2img and inpaint default to 0.8 and 0.5: ours (1.0, or the one asked) is always passed."""
    seen = []
    for mode in ("img2img", "inpaint"):
        cls = type(canny.runner.pipeline_for(mode))
        call = cls.__call__

        def spy(self, *args, __call=call, **kwargs):
            seen.append((type(self).__name__, kwargs.get("controlnet_conditioning_scale")))
            return __call(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    sample(canny, files["image"], init_image=files["init"])
    sample(canny, files["image"], mask_image=files["mask"], controlnet_conditioning_scale=0.3)
    assert seen == [("StableDiffusionControlNetImg2ImgPipeline", 1.0), ("StableDiffusionControlNetInpaintPipeline", 0.3)]


def test_the_pipelines_own_errors_come_back_in_the_clients_terms(canny):
    """A request the editing pipelines refuse (here from a direct caller: the request's checks stop clients
    first) fails with a message of ours, never diffusers' `image` for the control map (diffusers #14057)."""
    rgb = np.full((64, 64, 3), 128, np.uint8)
    control = canny.runner.control_map(rgb, (64, 64), 64, low_threshold=100, high_threshold=200)
    with pytest.raises(EditRefusedError, match="strength x ddim_steps runs no denoising step"):
        canny.runner.generate(control, Request(prompt="x", steps=2, init_image=rgb, strength=0.2))
    odd = np.full((60, 60, 3), 128, np.uint8)
    with pytest.raises(EditRefusedError, match=r"^inpaint could not run this request \(`height` and `width` have"):
        canny.runner.generate(odd, Request(prompt="x", steps=2, init_image=odd, mask=np.ones((60, 60), bool)))
    said = _client_terms("img2img", "For multiple controlnets: `image` must be type `list`")
    assert "`image`" not in said and "the control map must be type `list`" in said


# -- works with what exists ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_edits(canny, files, scheduler):
    txt2img = sample(canny, files["image"], scheduler=scheduler)
    img2img = sample(canny, files["image"], scheduler=scheduler, init_image=files["init"])
    inpaint = sample(canny, files["image"], scheduler=scheduler, mask_image=files["mask"])
    assert differs(img2img, txt2img)
    keep = outside(files["mask"], 4)
    upload = np.asarray(Image.open(files["image"])).astype(np.int16)
    np.testing.assert_array_equal(inpaint[keep], upload[keep])


def test_lora_and_embedding_apply_to_edits(canny, files):
    unet, width = canny.runner.pipe.unet, canny.runner.pipe.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(3)
    lora = random_lora(unet, "unet", ("to_q", "to_v"), g)  # every to_q / to_v of the UNet is an attention's
    uri = lambda state: "data:application/octet-stream;base64," + base64.b64encode(save(state)).decode()  # noqa: E731
    style = dict(lora_url=uri(lora))
    word = dict(embedding_url=uri({"emb_params": torch.randn(1, width, generator=g) * 3}), embedding_token="<x>")
    for edit in (dict(init_image=files["init"]), dict(mask_image=files["mask"])):
        edit |= dict(strength=1.0, prompt="a <x> house")  # both steps: the prompt shows more
        plain = sample(canny, files["image"], **edit)
        assert differs(sample(canny, files["image"], **edit, **style), plain)
        # the tiny text encoder steers weakly (a changed word moves pixels ~0.2): any change shows it applied
        assert not np.array_equal(sample(canny, files["image"], **edit, **word), plain)
        np.testing.assert_array_equal(sample(canny, files["image"], **edit), plain)  # and nothing stays after


def test_an_uploaded_map_with_an_init_image(canny, files, tmp_path):
    edges = cv2.Canny(np.asarray(Image.open(files["image"]).convert("L")), 100, 200)
    path = tmp_path / "map.png"
    Image.fromarray(edges).save(path)
    as_map = sample(canny, path, control_image_is_map=True)
    edited = sample(canny, path, control_image_is_map=True, init_image=files["init"])
    assert differs(edited, as_map)


def test_preprocess_only_ignores_the_edit_inputs_and_says_so(canny, files, capsys):
    plain = canny.generate(files["image"], **FAST, preprocess_only=True)
    assert len(plain) == 1
    plain = np.asarray(Image.open(plain[0]))  # before the next request replaces the files
    edit = canny.generate(files["image"], **FAST, preprocess_only=True, init_image=files["init"],
                          mask_image=files["black"], strength=0.01)  # none of them is even read
    assert len(edit) == 1
    np.testing.assert_array_equal(plain, np.asarray(Image.open(edit[0])))
    assert "preprocess_only: no image is generated, so init_image, strength and mask_blur are ignored, and " \
           "mask_image" in capsys.readouterr().out


def test_four_samples_each_keep_the_unmasked_pixels(canny, files):
    out = canny.generate(files["image"], **FAST, num_samples="4", mask_image=files["mask"])
    samples = [np.asarray(Image.open(f)).astype(np.int16) for f in out[1:]]
    upload = np.asarray(Image.open(files["image"])).astype(np.int16)
    keep = outside(files["mask"], 4)
    assert len(samples) == 4 and differs(samples[0], samples[1])
    for got in samples:
        np.testing.assert_array_equal(got[keep], upload[keep])


# -- the inpaint image (ControlNet 1.1's inpaint model) takes mask_image --------------------------------


def test_the_inpaint_image_takes_mask_image_and_keeps_its_alpha_path(files, tmp_path):
    inpaint = predictor_class("inpaint")()
    inpaint.setup()
    opaque = files["image"]
    with pytest.raises(ValueError, match="inpaint needs a mask: send mask_image"):
        inpaint.generate(opaque, **FAST)
    out = inpaint.generate(opaque, **FAST, mask_image=files["mask"])
    control, got = np.asarray(Image.open(out[0])), np.asarray(Image.open(out[1])).astype(np.int16)
    # the map's repainted pixels are mask_image's white area (blurred and thresholded as the 1.1 demo does)
    white = resize_to(np.asarray(Image.open(files["mask"])), *control.shape[:2]) >= 128
    assert control.shape[2] == 4 and np.mean((control[..., 3] == 0) == white) > 0.97
    keep = outside(files["mask"], 4)
    upload = np.asarray(Image.open(opaque)).astype(np.int16)
    np.testing.assert_array_equal(got[keep], upload[keep])
    # the upload's alpha still works without a mask_image
    holed = drawing(mode="RGBA")
    holed.paste((0, 0, 0, 0), BOX)
    holed.save(tmp_path / "holed.png")
    assert len(inpaint.generate(tmp_path / "holed.png", **FAST)) == 2


# -- through the real Cog server --------------------------------------------------------------------


def png_uri(img) -> str:
    return data_uri(png_bytes(img))


def test_the_schema_ends_with_the_edit_inputs(servers):
    props = requests.get(f"{servers['canny'].url}/openapi.json", timeout=10).json()
    props = props["components"]["schemas"]["Input"]["properties"]
    assert list(props)[-4:] == ["init_image", "mask_image", "strength", "mask_blur"]
    assert props["init_image"]["format"] == props["mask_image"]["format"] == "uri"
    assert (props["strength"]["default"], props["strength"]["minimum"], props["strength"]["maximum"]) == (0.8, 0, 1)
    assert (props["mask_blur"]["default"], props["mask_blur"]["minimum"]) == (4, 0)


def test_each_mode_over_http_and_the_unmasked_pixels_come_back_exactly(servers):
    server = servers["canny"]
    upload = drawing(W, H)
    mask = Image.new("L", upload.size, 0)
    ImageDraw.Draw(mask).rectangle(BOX, fill=255)
    base = dict(FAST, seed=3, image=png_uri(upload))

    def run(**edit):
        body = server.predict(base | edit).json()
        assert body["status"] == "succeeded", body.get("error")
        return [np.asarray(decode(uri)).astype(np.int16) for uri in body["output"]]

    map_, txt2img = run()
    img2img = run(init_image=png_uri(upload.rotate(90, expand=False)))[1]
    again = run(init_image=png_uri(upload.rotate(90, expand=False)))[1]
    stronger = run(init_image=png_uri(upload.rotate(90, expand=False)), strength=1.0)[1]  # 2 steps of 2, not 1
    control, inpaint = run(mask_image=png_uri(mask))
    assert differs(img2img, txt2img) and differs(stronger, img2img) and differs(inpaint, txt2img)
    np.testing.assert_array_equal(img2img, again)
    np.testing.assert_array_equal(control, map_)  # the map of `image`, as without editing
    keep = cv2.dilate(np.asarray(mask) // 255, np.ones((9, 9), np.uint8)) == 0
    np.testing.assert_array_equal(inpaint[keep], np.asarray(upload).astype(np.int16)[keep])


@pytest.mark.parametrize("bad", [{"strength": 1.5}, {"strength": -0.1}, {"mask_blur": -1}, {"mask_blur": 65}])
def test_out_of_bounds_edit_inputs_get_422(servers, bad):
    response = servers["canny"].predict({"prompt": "x", "image": png_uri(drawing()), **bad})
    assert response.status_code == 422


def test_bad_masks_over_http_fail_with_what_to_send_and_the_server_serves_on(servers):
    server = servers["canny"]
    image = png_uri(drawing(W, H))
    black = png_uri(Image.new("L", (W, H), 0))
    for edit, message in [
        ({"mask_image": black}, "mask_image has nothing to regenerate"),
        ({"mask_image": "data:text/plain;base64,aGVsbG8="}, "mask_image: image could not be decoded"),
        ({"init_image": image, "strength": 0.1, "ddim_steps": 5}, "raise strength (above 0) or ddim_steps"),
    ]:
        body = server.predict({**FAST, "image": image, **edit}).json()
        assert body["status"] == "failed" and message in body["error"], body.get("error")
        assert "Traceback" not in body["error"] and "/tmp" not in body["error"]
    assert server.predict({**FAST, "image": image}).json()["status"] == "succeeded"
