"""The multi image: several ControlNet units in one request (#19), on tiny weights. Most behaviour goes
through the plain method; one real Cog server (module-scoped) covers the schema and the HTTP errors."""

import functools

import numpy as np
import pytest
import requests
from PIL import Image

import weights
from cog_base.inputs import SHARED_CONTROLS, SHARED_HEAD, Inputs
from models.control import ControlNets
from scripts.cog_server import CogServer
from tests.conftest import data_uri, decode, drawing, png_bytes, predictor_class, set_up

FAST = dict(prompt="a house", image_resolution="256", ddim_steps=2, seed=5)
CONDITIONS = weights.COMBINED["multi"]


@pytest.fixture(scope="module")
def multi():
    p = predictor_class("multi")()
    p.setup()
    return p


single = functools.cache(set_up)


def pixels(files) -> list[np.ndarray]:
    return [np.asarray(Image.open(f)).astype(np.int16) for f in files]


def differs(a, b, by=0.5) -> bool:
    return float(np.abs(a - b).mean()) > by


def unit(n, condition, image, **fields):
    return {f"controlnet_{n}": condition, f"controlnet_{n}_image": image,
            **{f"controlnet_{n}_{name}": value for name, value in fields.items()}}


@pytest.mark.parametrize("condition, own, fields", [
    ("canny", dict(num_samples="4"), {}),
    ("seg", dict(controlnet_conditioning_scale=0.7, control_guidance_end=0.5, guess_mode=True),
     dict(conditioning_scale=0.7, end=0.5)),
    # ControlNet 1.1: a detector with its own options (at their defaults), a pooling ControlNet, the upload as map
    ("lineart", dict(controlnet_conditioning_scale=0.8), dict(conditioning_scale=0.8)),
    ("shuffle", {}, {}),
    ("tile", dict(control_guidance_start=0.5), dict(start=0.5)),
])
def test_one_unit_gives_the_conditions_own_images(multi, image_file, condition, own, fields):
    path = image_file()
    expected = pixels(single(condition).generate(path, **FAST, **own))
    shared = {k: v for k, v in own.items() if k in ("num_samples", "guess_mode")}
    got = pixels(multi.generate(**unit(1, condition, path, **fields), **FAST, **shared))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_maps_of_the_active_units_come_first_in_unit_order_then_the_samples(multi, image_file):
    files = multi.generate(**unit(1, "canny", image_file()), **unit(3, "depth", image_file()), **FAST, num_samples="4")
    assert [f.name.split("-", 1)[1] for f in files] == [
        "control-1-canny.png", "control-3-depth.png", "sample-1.png", "sample-2.png", "sample-3.png", "sample-4.png"]
    only_samples = multi.generate(**unit(1, "canny", image_file()), **FAST, return_control_map=False)
    assert [f.name.split("-", 1)[1] for f in only_samples] == ["sample-1.png"]
    only_maps = multi.generate(**unit(1, "canny", image_file()), **unit(2, "hough", image_file()), **FAST,
                               preprocess_only=True)
    assert [f.name.split("-", 1)[1] for f in only_maps] == ["control-1-canny.png", "control-2-hough.png"]


def test_a_second_unit_changes_the_samples_and_its_strength_matters(multi, image_file):
    path = image_file()
    one = pixels(multi.generate(**unit(1, "canny", path), **FAST))
    weak = pixels(multi.generate(**unit(1, "canny", path), **unit(2, "depth", path, conditioning_scale=0.3), **FAST))
    strong = pixels(multi.generate(**unit(1, "canny", path), **unit(2, "depth", path, conditioning_scale=1.5), **FAST))
    np.testing.assert_array_equal(one[0], weak[0])  # unit 1's map is unit 1's alone
    assert differs(one[-1], weak[-1]) and differs(weak[-1], strong[-1])


def test_a_unit_outside_its_window_for_every_step_equals_leaving_it_out(multi, image_file):
    path = image_file()
    hed = multi.conditions["hed"].controlnet
    alone = pixels(multi.generate(**unit(1, "canny", path), **FAST))
    late = multi.generate(**unit(1, "canny", path), **unit(2, "hed", path, start=0.99, end=1.0), **FAST)
    np.testing.assert_array_equal(pixels(late)[-1], alone[-1])
    assert "control-2-hed" in late[1].name  # its map is still returned
    assert hed not in multi.runner.controlnets.loaded  # and its ControlNet was never needed
    early = pixels(multi.generate(**unit(1, "canny", path), **unit(2, "hed", path, start=0.0, end=0.5), **FAST))
    assert differs(early[-1], alone[-1])


def test_a_shuffle_unit_acts_the_same_in_any_position(multi, image_file):
    # 1.1 shuffle pools its conditioning and acts on the prompted half of the guidance batch only; diffusers
    # decides that from the first net alone, which made a shuffle unit first change every unit's treatment.
    path = image_file(width=320, height=256)  # the sample's aspect: no unit's image is cropped
    first = pixels(multi.generate(**unit(1, "shuffle", path), **unit(2, "canny", path), **FAST))
    second = pixels(multi.generate(**unit(1, "canny", path), **unit(2, "shuffle", path), **FAST))
    np.testing.assert_array_equal(first[-1], second[-1])
    assert (first[0] == second[1]).all() and (first[1] == second[0]).all()  # the maps follow the units
    canny = pixels(multi.generate(**unit(1, "canny", path), **FAST))
    assert differs(canny[-1], second[-1])  # and the shuffle unit does act


def test_a_pooling_controlnet_among_several_acts_on_the_prompted_half_only(multi):
    import torch

    from models.pipeline import PromptedSideOnly

    net = multi.runner.controlnets.get([multi.conditions["shuffle"].controlnet])[0]
    torch.manual_seed(0)
    sample, cond = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1), torch.rand(1, 3, 64, 64).repeat(2, 1, 1, 1)
    hidden = torch.randn(1, 77, net.config.cross_attention_dim).repeat(2, 1, 1)
    args = dict(sample=sample, timestep=10, encoder_hidden_states=hidden, controlnet_cond=cond, conditioning_scale=1.0,
                return_dict=False)
    with torch.no_grad():
        down, mid = net(**args)
        wrapped_down, wrapped_mid = PromptedSideOnly(net, cfg=True)(**args)
        guess_down, _ = PromptedSideOnly(net, cfg=True)(**args, guess_mode=True)  # the batch is all prompted
        no_cfg_down, _ = PromptedSideOnly(net, cfg=False)(**args)
    assert float(down[0][0].abs().max()) > 0 and float(mid[0].abs().max()) > 0
    for full, wrapped in zip([*down, mid], [*wrapped_down, wrapped_mid]):
        assert (wrapped[0] == 0).all() and torch.equal(wrapped[1], full[1])  # [unprompted, prompted]
    assert all(torch.equal(a, b) for a, b in zip(down, guess_down)) and all(torch.equal(a, b) for a, b in zip(down, no_cfg_down))


def test_units_of_other_sizes_are_centre_cropped_to_the_first_units_size(multi, image_file, tmp_path):
    first, portrait = image_file(), image_file(width=200, height=400, name="portrait.png")
    files = multi.generate(**unit(1, "canny", first), **unit(2, "canny", portrait), **unit(3, "seg", first), **FAST)
    assert {Image.open(f).size for f in files} == {(320, 256)}
    # 200x400 to the 320:256 aspect keeps the middle 160 rows; canny of that crop alone is unit 2's map.
    Image.fromarray(np.asarray(Image.open(portrait))[120:280]).save(tmp_path / "crop.png")
    expected = pixels(single("canny").generate(tmp_path / "crop.png", **FAST, preprocess_only=True))[0]
    np.testing.assert_array_equal(pixels(files)[1], expected)
    exact = multi.generate(**unit(1, "canny", first), **unit(2, "depth", portrait), **FAST, width=300, height=200)
    sizes = [Image.open(f).size for f in exact]
    assert sizes[:2] == [(320, 192)] * 2 and sizes[2] == (300, 200)


def test_the_same_condition_twice_works_and_loads_its_controlnet_once(multi, image_file):
    first, other = image_file(), image_file(width=300, height=400, name="other.png")
    alone = pixels(multi.generate(**unit(1, "canny", first), **FAST))
    twice = multi.generate(**unit(1, "canny", first), **unit(2, "canny", other), **FAST)
    assert differs(pixels(twice)[-1], alone[-1])
    assert multi.runner.controlnets.loaded.count(multi.conditions["canny"].controlnet) == 1


@pytest.mark.parametrize("inputs, message", [
    (dict(controlnet_1="inpaint"), "controlnet_1 must be one of none, canny, depth"),
    ({}, "no control unit: set controlnet_1 to a condition"),
    (dict(controlnet_2_image="IMAGE"), "controlnet_2_image was sent but controlnet_2 is none"),
    (dict(controlnet_2="depth"), "controlnet_2 is depth but controlnet_2_image is missing"),
    (dict(controlnet_2="depth", controlnet_2_image="IMAGE", controlnet_2_start=0.6, controlnet_2_end=0.4),
     r"controlnet_2_start \(0.6\) must be below controlnet_2_end \(0.4\)"),
    (dict(controlnet_3="canny", controlnet_3_image="IMAGE", controlnet_3_image_is_map=True),
     "controlnet_3_image_is_map is on, but .* white lines on black. Send a canny map"),
    (dict(controlnet_3="canny", controlnet_3_image="TEXT"), "controlnet_3_image: image could not be decoded"),
    (dict(controlnet_2="softedge", controlnet_2_image="IMAGE", controlnet_2_image_is_map=True),
     "controlnet_2_image_is_map is on, but only .* dark, so it is not a map of light lines on black. Send a softedge map"),
    (dict(controlnet_3_conditioning_scale=2.5), "controlnet_3_conditioning_scale must be between 0.0 and 2.0"),
])
def test_each_bad_unit_gets_an_error_naming_the_unit_and_the_fix(multi, image_file, tmp_path, inputs, message):
    (tmp_path / "notes.txt").write_text("not an image")
    files = {"IMAGE": image_file(), "TEXT": tmp_path / "notes.txt"}
    inputs = {k: files.get(v, v) if isinstance(v, str) else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match=message):
        multi.generate(**inputs, **FAST)


def test_controlnets_load_on_first_use_and_the_least_recently_used_go_beyond_the_bound():
    calls = []
    store = ControlNets(lambda folder: calls.append(folder) or f"net {folder}", max_loaded=2, log=lambda line: None)
    assert store.get(["a"]) == ["net a"] and store.get(["b", "b"]) == ["net b", "net b"]
    store.get(["a"])  # a is now the most recently used
    store.get(["c"])
    assert [p.name for p in store.loaded] == ["a", "c"]
    store.get(["a", "b", "c"])  # a request may need more than the bound: all are held for it
    assert len(store.loaded) == 3
    store.get(["b"])
    assert [p.name for p in store.loaded] == ["c", "b"]
    assert [str(c) for c in calls] == ["a", "b", "c", "b"]


def test_setup_loads_no_controlnet_and_no_detector_and_a_map_needs_no_detector(monkeypatch, tmp_path):
    from models.detectors.seg import ADE20K_PALETTE

    monkeypatch.setenv("CONTROLNET_MAX_LOADED", "1")
    p = predictor_class("multi")()
    p.setup()
    assert p.runner.controlnets.loaded == [] and not any(c.detector_loaded for c in p.conditions.values())
    seg_map = np.zeros((300, 400, 3), np.uint8)
    seg_map[:, :200], seg_map[:, 200:] = ADE20K_PALETTE[2], ADE20K_PALETTE[6]
    Image.fromarray(seg_map).save(tmp_path / "seg.png")
    drawing().save(tmp_path / "photo.png")
    p.generate(**unit(1, "seg", tmp_path / "seg.png", image_is_map=True), **FAST)
    assert not p.conditions["seg"].detector_loaded
    assert p.runner.controlnets.loaded == [p.conditions["seg"].controlnet]
    p.generate(**unit(1, "canny", tmp_path / "photo.png"), **unit(2, "depth", tmp_path / "photo.png"), **FAST)
    assert p.conditions["depth"].detector_loaded and not p.conditions["normal"].detector_loaded
    p.generate(**unit(1, "canny", tmp_path / "photo.png"), **FAST)
    assert p.runner.controlnets.loaded == [p.conditions["canny"].controlnet]  # bound 1: the others dropped


def test_a_multi_signature_must_leave_the_unit_inputs_to_the_units():
    from cog_base import MultiControlNetPredictor

    with pytest.raises(TypeError, match=r"must take \['prompt', 'num_samples'"):
        class WithImage(MultiControlNetPredictor):
            def predict(self, image=Inputs.image, prompt=Inputs.prompt):
                pass


def test_the_unit_choices_are_the_conditions_multi_combines():
    for n in (1, 2, 3):
        assert getattr(Inputs, f"controlnet_{n}").json_schema_extra["enum"] == ["none", *CONDITIONS]
    assert "custom" not in CONDITIONS and set(CONDITIONS) < set(weights.CONDITIONS)


# -- through the real Cog server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cog = CogServer("multi", log_path=tmp_path_factory.mktemp("cog") / "multi.log")
    cog.start()
    yield cog
    cog.stop()


GOOD = dict(FAST, seed=7)


def test_schema_has_the_shared_inputs_around_the_units_and_no_image(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    inputs = schema["components"]["schemas"]["Input"]
    props = inputs["properties"]
    units = [name.format(n=n) for n in (1, 2, 3) for name in (
        "controlnet_{n}", "controlnet_{n}_image", "controlnet_{n}_conditioning_scale", "controlnet_{n}_start",
        "controlnet_{n}_end", "controlnet_{n}_image_is_map")]
    assert list(props) == [*SHARED_HEAD, *units, *SHARED_CONTROLS]
    assert inputs["required"] == ["prompt"]
    assert schema["components"]["schemas"]["controlnet_1"]["enum"] == ["none", *CONDITIONS]
    assert props["controlnet_2_image"]["format"] == "uri"
    assert (props["controlnet_3_end"]["default"], props["controlnet_3_end"]["maximum"]) == (1.0, 1.0)


def test_editing_with_several_samples_keeps_server_paths_out_of_the_logs(server):
    """diffusers' FutureWarning on img2img with several samples names its site-packages file: it goes
    to the server's log, not the client's (issue 29). Before the other HTTP tests: Python shows a
    warning once per place."""
    from tests.test_serving import no_server_path_in

    image = data_uri(png_bytes(drawing(320, 256)))
    mask = data_uri(png_bytes(Image.new("L", (320, 256), 255)))
    base = dict(GOOD, **unit(1, "canny", image), **unit(2, "canny", image), num_samples="4")
    for edit in ({"init_image": image}, {"mask_image": mask}, {"init_image": image, "mask_image": mask}):
        body = server.predict(base | edit).json()
        assert body["status"] == "succeeded", body.get("error")
        no_server_path_in(body["logs"])
    assert "FutureWarning" in server.log()


def test_a_units_download_error_names_its_input(server):
    from tests.conftest import Receiver

    inputs = dict(GOOD, **unit(1, "canny", data_uri(png_bytes(drawing()))),
                  **unit(2, "canny", Receiver().url("/missing.png")))
    body = server.predict(inputs).json()
    assert body["status"] == "failed" and body["error"].startswith("controlnet_2_image: "), body["error"]
    assert "answered HTTP 404" in body["error"]


def test_one_unit_over_http_gives_the_conditions_own_images(server, tmp_path):
    drawing().save(tmp_path / "in.png")
    body = server.predict({**unit(1, "canny", data_uri((tmp_path / "in.png").read_bytes())), **GOOD}).json()
    assert body["status"] == "succeeded", body.get("error")
    expected = pixels(single("canny").generate(tmp_path / "in.png", **GOOD))
    got = [np.asarray(decode(uri)).astype(np.int16) for uri in body["output"]]
    assert len(got) == 2
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [
    {"controlnet_1": "inpaint"}, {"controlnet_2_conditioning_scale": 2.5}, {"controlnet_1_start": 1.5},
    {"controlnet_3_image_is_map": "maybe"},
])
def test_out_of_schema_unit_inputs_get_422(server, bad):
    inputs = {**unit(1, "canny", data_uri(png_bytes(drawing()))), "prompt": "x"} | bad
    assert server.predict(inputs).status_code == 422


def test_inconsistent_units_fail_with_the_fix_and_the_server_serves_on(server):
    image = data_uri(png_bytes(drawing()))
    cases = [
        ({"prompt": "x"}, "no control unit"),
        ({**unit(1, "canny", image), "controlnet_2_image": image, "prompt": "x"}, "controlnet_2 is none"),
        ({**unit(1, "canny", image), **unit(2, "seg", image, start=0.5, end=0.5), "prompt": "x"},
         "controlnet_2_start (0.5) must be below controlnet_2_end (0.5)"),
    ]
    for inputs, message in cases:
        body = server.predict(inputs).json()
        assert body["status"] == "failed" and message in body["error"], body
    two = server.predict({**unit(1, "canny", image), **unit(2, "pose", image), **GOOD}).json()
    assert two["status"] == "succeeded", two.get("error")
    assert len(two["output"]) == 3


def test_editing_over_http_edits_the_first_units_image_and_keeps_its_unmasked_pixels(server):
    """#20 on the multi image: a mask without init_image edits controlnet_1_image; init_image is img2img."""
    import cv2
    from PIL import ImageDraw

    upload = drawing(160, 120)
    mask = Image.new("L", upload.size, 0)
    ImageDraw.Draw(mask).rectangle((40, 30, 100, 80), fill=255)
    base = dict(GOOD, ddim_steps=2, width=160, height=120, **unit(1, "canny", data_uri(png_bytes(upload))),
                **unit(2, "scribble", data_uri(png_bytes(upload.rotate(180)))))
    runs = {}
    for name, edit in [("plain", {}), ("inpaint", {"mask_image": data_uri(png_bytes(mask))}),
                       ("img2img", {"init_image": data_uri(png_bytes(upload.rotate(90)))})]:
        body = server.predict(base | edit).json()
        assert body["status"] == "succeeded", (name, body.get("error"))
        assert len(body["output"]) == 3  # the two units' maps, then the sample
        runs[name] = np.asarray(decode(body["output"][-1])).astype(np.int16)
    keep = cv2.dilate(np.asarray(mask) // 255, np.ones((9, 9), np.uint8)) == 0
    np.testing.assert_array_equal(runs["inpaint"][keep], np.asarray(upload).astype(np.int16)[keep])
    assert differs(runs["inpaint"], runs["plain"]) and differs(runs["img2img"], runs["plain"])
    assert differs(runs["img2img"], runs["inpaint"])


def test_the_playground_builds_the_multi_form_from_the_schema_and_runs_two_units(server, tmp_path):
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
            assert page.get_attribute("#in-controlnet_2_image", "type") == "file"
            page.select_option("#in-controlnet_1", "canny")
            page.set_input_files("#in-controlnet_1_image", str(tmp_path / "in.png"))
            page.select_option("#in-controlnet_2", "depth")
            page.set_input_files("#in-controlnet_2_image", str(tmp_path / "in.png"))
            page.fill("#in-prompt", "a house")
            page.select_option("#in-image_resolution", "256")
            page.fill("#in-ddim_steps", "2")
            page.click("#run")
            page.wait_for_selector("figure img.sample", timeout=300_000)
            assert page.locator("figure img.control").count() == 2 and page.locator("figure img.sample").count() == 1
            assert page.locator("figcaption").all_text_contents() == ["control map 1", "control map 2", "sample 1"]
        finally:
            browser.close()
