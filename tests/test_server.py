"""The real Cog HTTP server (`python -m cog.server.http`, the image's entry point), one per condition."""

import base64
import time

import numpy as np
import pytest
import requests
from PIL import Image

import weights
from cog_base.inputs import CONTROLS, JAGILLEY_INPUTS
from tests.conftest import data_uri, decode, drawing, png_bytes, predictor_class, random_lora

CONDITIONS = weights.CONDITIONS


def schema_inputs(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    return schema, schema["components"]["schemas"]["Input"]


def same_but_order(a: dict, b: dict) -> bool:
    """x-order is the position in the signature, which the condition's own inputs shift."""
    return {k: v for k, v in a.items() if k != "x-order"} == {k: v for k, v in b.items() if k != "x-order"}


GOOD = {"prompt": "a house", "image_resolution": "256", "ddim_steps": 2, "seed": 7}


def test_health_check_is_ready_and_start_up_says_tiny_weights(server):
    assert requests.get(f"{server.url}/health-check", timeout=10).json()["status"] == "READY"
    assert "TINY RANDOM-WEIGHT" in server.log()


def test_schema_has_the_shared_inputs_then_the_declared_extras(server):
    schema, inputs = schema_inputs(server)
    props = inputs["properties"]
    cls = predictor_class(server.condition)
    assert (cls.head_inputs, cls.tail_inputs) == (JAGILLEY_INPUTS, CONTROLS)  # multi: tests/test_multi.py
    assert list(props) == [*cls.head_inputs, *cls.extra_inputs, *cls.tail_inputs]
    # hed also takes `input_image` (jagilley's published hed name), so its `image` is optional.
    required = ["prompt"] if "input_image" in props else ["image", "prompt"]
    assert sorted(inputs.get("required", [])) == required
    assert props["image"]["format"] == "uri"
    assert props["ddim_steps"]["default"] == 20 and props["ddim_steps"]["minimum"] == 1
    assert props["scale"]["default"] == 9.0
    enums = schema["components"]["schemas"]
    assert enums["num_samples"]["enum"] == ["1", "4"] and props["num_samples"]["default"] == "1"
    assert enums["image_resolution"]["enum"] == ["256", "512", "768"] and props["image_resolution"]["default"] == "512"
    assert props["seed"].get("default") is None
    assert schema["components"]["schemas"]["Output"]["type"] == "array"


def test_shared_inputs_are_identical_in_every_schema(servers):
    schemas = {c: schema_inputs(s) for c, s in servers.items()}
    reference_schema, reference = schemas["canny"]
    for condition, (schema, inputs) in schemas.items():
        for name in [*JAGILLEY_INPUTS, *CONTROLS]:
            if name == "image" and "input_image" in inputs["properties"]:
                continue  # hed's optional image, checked below
            assert same_but_order(inputs["properties"][name], reference["properties"][name]), (condition, name)
        for enum in ("num_samples", "image_resolution", "scheduler"):
            assert schema["components"]["schemas"][enum] == reference_schema["components"]["schemas"][enum]
        if "controlnet_version" in inputs["properties"]:  # the eight images that had a 1.0 model
            assert same_but_order(inputs["properties"]["controlnet_version"], reference["properties"]["controlnet_version"])
            assert schema["components"]["schemas"]["controlnet_version"]["enum"] == ["1.0", "1.1"]
    detecting = [inputs["properties"]["detect_resolution"] for _, inputs in schemas.values()
                 if "detect_resolution" in inputs["properties"]]
    assert len(detecting) >= 1 and all(d == detecting[0] for d in detecting)
    assert detecting[0]["default"] == 512 and (detecting[0]["minimum"], detecting[0]["maximum"]) == (128, 1024)


def test_new_controls_default_to_the_jagilley_behaviour(servers):
    props = schema_inputs(servers["canny"])[1]["properties"]
    defaults = {name: props[name].get("default") for name in CONTROLS}
    assert defaults == {
        "controlnet_conditioning_scale": 1.0, "guess_mode": False, "control_guidance_start": 0.0,
        "control_guidance_end": 1.0, "scheduler": "DDIM", "control_image_is_map": False,
        "return_control_map": True, "output_format": "png", "output_quality": 80, "preprocess_only": False,
        "width": 0, "height": 0,
        "lora_url": "", "lora_scale": 1.0, "embedding_url": "", "embedding_token": "",
        "init_image": None, "mask_image": None, "strength": 0.8, "mask_blur": 4,
    }


def test_hed_takes_input_image_as_its_published_clients_send_it(servers):
    if "hed" not in servers:
        pytest.skip("no hed condition")
    server = servers["hed"]
    uri = data_uri(png_bytes(drawing()))
    body = server.predict({"input_image": uri, **GOOD}).json()
    assert body["status"] == "succeeded", body.get("error")
    assert [decode(u).size for u in body["output"]] == [(320, 256), (320, 256)]
    both = server.predict({"input_image": uri, "image": uri, **GOOD}).json()
    assert both["status"] == "failed" and "exactly one of `image` or `input_image`" in both["error"]
    neither = server.predict(GOOD).json()
    assert neither["status"] == "failed" and "image is required" in neither["error"]


def test_preprocess_only_over_http_returns_the_map_alone(servers):
    body = servers["canny"].predict({"image": data_uri(png_bytes(drawing())), **GOOD, "preprocess_only": True}).json()
    assert body["status"] == "succeeded", body.get("error")
    assert len(body["output"]) == 1 and decode(body["output"][0]).size == (320, 256)
    assert "step 1/" not in body["logs"]


def test_canny_extras_keep_the_jagilley_defaults(servers):
    props = schema_inputs(servers["canny"])[1]["properties"]
    assert (props["low_threshold"]["default"], props["high_threshold"]["default"]) == (100, 200)
    assert (props["low_threshold"]["minimum"], props["low_threshold"]["maximum"]) == (1, 255)


def test_sync_prediction_returns_the_map_then_the_sample(server):
    response = server.predict({"image": data_uri(png_bytes(drawing())), **GOOD})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    images = [decode(uri) for uri in body["output"]]
    assert [img.size for img in images] == [(320, 256), (320, 256)]
    assert "Using seed: 7" in body["logs"]
    assert "TINY RANDOM-WEIGHT" in body["logs"]


def test_four_samples_over_http(servers):
    body = servers["canny"].predict(
        {"image": data_uri(png_bytes(drawing(mode="RGBA"))), "prompt": "x", "num_samples": "4", "image_resolution": "256", "ddim_steps": 1}
    ).json()
    assert body["status"] == "succeeded", body.get("error")
    assert len(body["output"]) == 5
    assert "Using seed: " in body["logs"]


@pytest.mark.parametrize(
    "bad",
    [
        {"ddim_steps": -3},
        {"num_samples": "7"},
        {"image_resolution": "1024"},
        {"scale": 0},
        {"seed": -2},
        {"image": "not a url"},
        {"prompt": None},
        {"controlnet_conditioning_scale": 2.5},
        {"control_guidance_end": 1.5},
        {"scheduler": "PLMS"},
        {"width": 4096},
        {"guess_mode": "maybe"},
    ],
)
def test_bad_input_gets_422(server, bad):
    inputs = {"image": data_uri(png_bytes(drawing())), "prompt": "a house"} | bad
    inputs = {k: v for k, v in inputs.items() if v is not None}
    assert server.predict(inputs).status_code == 422


@pytest.mark.parametrize(
    "condition, bad",
    [("canny", {"low_threshold": 256}), ("hough", {"value_threshold": 3.0}), ("hough", {"detect_resolution": 64}),
     ("hed", {"detect_resolution": 2048}), ("normal", {"bg_threshold": 1.5}), ("seg", {"detect_resolution": 100}),
     ("depth", {"detect_resolution": 127}), ("pose", {"detect_resolution": 1025})],
)
def test_bad_condition_inputs_get_422(servers, condition, bad):
    if condition not in servers:
        pytest.skip(f"{condition} is not a condition")
    assert servers[condition].predict({"image": data_uri(png_bytes(drawing())), "prompt": "x"} | bad).status_code == 422


def test_pose_without_a_person_answers_a_black_map_and_says_so(servers):
    """The tiny OpenPose finds nobody in any image (see PoseDetector.save_random): not an error."""
    if "pose" not in servers:
        pytest.skip("pose is not a condition")
    body = servers["pose"].predict({"image": data_uri(png_bytes(drawing())), **GOOD}).json()
    assert body["status"] == "succeeded", body.get("error")
    control = decode(body["output"][0])
    assert control.size == (320, 256) and control.getextrema() == ((0, 0),) * 3
    assert "pose: no person found" in body["logs"]


def test_image_by_http_url(servers, tmp_path):
    """Cog downloads URL inputs itself; served here from loopback."""
    import functools
    import http.server
    import threading

    drawing().save(tmp_path / "house.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/house.png"
        body = servers["canny"].predict({"image": url, **GOOD}).json()
    finally:
        httpd.shutdown()
    assert body["status"] == "succeeded", body.get("error")
    assert [decode(uri).size for uri in body["output"]] == [(320, 256), (320, 256)]


def test_undecodable_image_fails_with_a_message_and_the_server_survives(server):
    body = server.predict({"image": data_uri(b"not an image at all"), "prompt": "x"}).json()
    assert body["status"] == "failed"
    assert "could not be decoded" in body["error"]
    ok = server.predict({"image": data_uri(png_bytes(drawing())), **GOOD})
    assert ok.json()["status"] == "succeeded"


def test_make_predict_types_inputs_by_the_served_schema(servers, tmp_path, capsys):
    from scripts.predict import main

    drawing().save(tmp_path / "in.png")
    url = servers["canny"].url
    main(["--url", url, "--out", str(tmp_path / "out"), "-i", f"image=@{tmp_path / 'in.png'}", "-i", "prompt=a house",
          "-i", "num_samples=4", "-i", "image_resolution=256", "-i", "ddim_steps=1", "-i", "guess_mode=true",
          "-i", "scale=4.5"])
    written = sorted(p.name.split("-", 2)[-1] for p in (tmp_path / "out").iterdir())
    assert len(written) == 5 and written[0].endswith("control.png")
    with pytest.raises(SystemExit, match="no input 'steps'; it takes: image, prompt"):
        main(["--url", url, "-i", f"image=@{tmp_path / 'in.png'}", "-i", "steps=3"])
    with pytest.raises(SystemExit, match="expected integer for ddim_steps"):
        main(["--url", url, "-i", f"image=@{tmp_path / 'in.png'}", "-i", "ddim_steps=many"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["--url", url, "-i", "image=@/nonexistent.png", "-i", "prompt=x"])


def test_a_lora_by_data_uri_through_the_server(servers):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save

    unet = UNet2DConditionModel.from_pretrained(weights.locate("canny").base / "unet", variant="fp16")
    state = random_lora(unet, "unet", ("attn1.to_q", "attn1.to_v"), torch.Generator().manual_seed(0))
    uri = "data:application/octet-stream;base64," + base64.b64encode(save(state)).decode()
    image = data_uri(png_bytes(drawing()))
    plain = servers["canny"].predict({"image": image, **GOOD}).json()
    styled = servers["canny"].predict({"image": image, **GOOD, "lora_url": uri, "lora_scale": 2.0}).json()
    assert styled["status"] == "succeeded", styled.get("error")
    assert "load LoRA/embedding" in styled["logs"]
    assert styled["output"][1] != plain["output"][1] and styled["output"][0] == plain["output"][0]
    bad = servers["canny"].predict({"image": image, **GOOD, "lora_url": data_uri(b"not safetensors")}).json()
    assert bad["status"] == "failed" and "not a .safetensors file" in bad["error"]


def served_schema(condition):
    """The schema Cog serves for a condition, built in this process by Cog's own app factory."""
    from cog.config import Config
    from cog.server.http import create_app

    from cog_base.cog016.choices import restore_choices

    restore_choices()  # an earlier build in this process took them
    config = Config({"predict": f"predictors/{condition}/predict.py:Predictor", "build": {"gpu": True}})
    return create_app(cog_config=config, shutdown_event=None, is_build=True).openapi()


def holed_png() -> bytes:
    rgba = drawing(mode="RGBA")
    rgba.paste((0, 0, 0, 0), (100, 60, 260, 200))  # transparent: the pixels inpaint repaints
    return png_bytes(rgba)


# condition -> (a request of its own, an input its schema refuses)
CONTROLNET_11 = {
    "lineart": ({"detect_resolution": 128, "lineart_preprocessor": "coarse"}, {"lineart_preprocessor": "anime"}),
    "softedge": ({"detect_resolution": 128, "softedge_preprocessor": "hed_safe"}, {"softedge_preprocessor": "canny"}),
    "shuffle": ({}, {"num_samples": "2"}),
    "tile": ({}, {"image_resolution": "1024"}),
    "ip2p": ({"prompt": "make it winter"}, {"ddim_steps": 0}),
    "inpaint": ({"image": data_uri(holed_png())}, {"scale": 31}),
}


def test_each_controlnet_11_image_serves_through_its_own_server(tmp_path):
    """One server at a time (conftest.ONE_AT_A_TIME), each stopped before the next starts."""
    from scripts.cog_server import CogServer
    from tests.conftest import ONE_AT_A_TIME

    assert sorted(CONTROLNET_11) == sorted(ONE_AT_A_TIME)
    reference = served_schema("canny")["components"]["schemas"]["Input"]["properties"]
    for condition, (own, refused) in CONTROLNET_11.items():
        start = time.monotonic()
        with CogServer(condition, log_path=tmp_path / f"{condition}.log") as server:
            print(f"{condition}: READY after {time.monotonic() - start:.0f}s", flush=True)
            assert "TINY RANDOM-WEIGHT" in server.log(), condition
            schema, inputs = schema_inputs(server)
            props = inputs["properties"]
            assert list(props) == [*JAGILLEY_INPUTS, *predictor_class(condition).extra_inputs, *CONTROLS]
            for name in [*JAGILLEY_INPUTS, *CONTROLS]:
                assert same_but_order(props[name], reference[name]), (condition, name)
            response = server.predict({"image": data_uri(png_bytes(drawing())), **GOOD, **own})
            body = response.json()
            assert body["status"] == "succeeded", (condition, body.get("error"))
            images = [decode(uri) for uri in body["output"]]
            assert [img.size for img in images] == [(320, 256), (320, 256)], condition
            assert images[0].mode == ("RGBA" if condition == "inpaint" else "RGB")
            assert server.predict({"image": data_uri(png_bytes(drawing())), "prompt": "x"} | refused).status_code == 422
            if condition == "inpaint":  # an opaque upload: what it needs, and the server keeps serving
                body = server.predict({"image": data_uri(png_bytes(drawing())), **GOOD}).json()
                assert body["status"] == "failed" and "inpaint needs a mask" in body["error"]
                # ... or a mask_image (#20): the map from image and mask, the pixels outside it kept
                mask = Image.new("L", (400, 300), 0)
                mask.paste(255, (100, 60, 260, 200))
                opaque = drawing()
                body = server.predict({"image": data_uri(png_bytes(opaque)), "mask_image": data_uri(png_bytes(mask)),
                                       **GOOD, "width": 400, "height": 300}).json()
                assert body["status"] == "succeeded", body.get("error")
                control, sample = (np.asarray(decode(uri)) for uri in body["output"])
                assert (control[..., 3] == 0).any() and (control[..., 3] == 255).any()
                far = np.ones((300, 400), bool)
                far[60 - 5 : 200 + 5, 100 - 5 : 260 + 5] = False  # the mask (rows 60-199, columns 100-259) grown by 5
                assert np.array_equal(sample[far], np.asarray(opaque)[far])
            if condition == "lineart":  # a photo sent as a map is refused as on the other images
                body = server.predict({"image": data_uri(png_bytes(drawing())), **GOOD, "control_image_is_map": True}).json()
                assert body["status"] == "failed" and "control_image_is_map is on" in body["error"]
            assert requests.get(f"{server.url}/health-check", timeout=10).json()["status"] == "READY"
        print(f"{condition}: done after {time.monotonic() - start:.0f}s", flush=True)
