"""What a new user meets first: `make help`, quiet output, the tiny tokenizer, the README's curl
example as written, and the playground page in a real headless browser."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import weights
from scripts.cog_config import ROOT
from scripts.cog_server import CogServer

README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def test_make_help_lists_every_target():
    targets = set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", MAKEFILE, re.M))
    assert {"help", "test", "playground"} <= targets
    help_text = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = set(re.findall(r"^make ([\w-]+)", help_text, re.M))
    assert targets - listed == set(), f"targets missing from `make help`: {sorted(targets - listed)}"


def test_make_help_is_aligned_and_names_its_variables():
    help_text = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows = [line for line in help_text.splitlines() if line.startswith("make ")]
    columns = {re.match(r"make .*?\S  +(?=\S)", row).end() for row in rows}
    assert len(columns) == 1, rows  # every description starts in the same column
    for variable in ("PORT", "PLAYGROUND_PORT", "KEEP", "COND"):
        assert re.search(rf"^  {variable} ", help_text, re.M), variable


@pytest.mark.parametrize("target, expected", [
    ("quickstart", "--port 6123"), ("playground", "--cog-port 6123"), ("train PAIRS=x.zip", "--port 6123"),
    ("soak", "--port 6123"), ("fuzz", "FUZZ_PORT=6123"), ("image-test", "--port 6123"), ("serve", "--port 6123"),
    ("predict IMAGE=x.png", "--port 6123"),
])
def test_every_target_that_starts_a_server_takes_port(target, expected):
    # Under `make test` the suite runs inside make: a nested make would add "Leaving directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    dry = subprocess.run(["make", "-n", *target.split(), "PORT=6123"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=env)
    assert expected in dry.stdout.splitlines()[-1]
    if target not in ("serve", "predict IMAGE=x.png"):  # those two default to 5000; the others to a free port
        plain = subprocess.run(["make", "-n", *target.split()], cwd=ROOT, capture_output=True, text=True, check=True,
                               env={k: v for k, v in env.items() if k != "PORT"})
        assert expected.split()[0].split("=")[0] + ("" if "=" in expected else " ") not in plain.stdout.splitlines()[-1]


def test_a_busy_or_impossible_port_is_one_line_before_anything_starts():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for module in ("scripts.serve canny", "scripts.quickstart --port", "scripts.soak --port"):
            done = subprocess.run([sys.executable, "-m", *module.split(), *(["--port"] if module.endswith("canny") else []),
                                   str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert done.stderr.strip().splitlines() == [done.stderr.strip()] and f"port {port}" in done.stderr
            assert "TINY" not in done.stdout  # refused before the server's banner
    done = subprocess.run([sys.executable, "-m", "scripts.serve", "canny", "--port", "99999"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "not a port" in done.stderr


def make_targets() -> list[str]:
    return sorted(set(re.findall(r"^([a-z][\w-]*):", MAKEFILE, re.M)))


def test_an_unknown_cond_is_one_line_listing_the_conditions_for_every_target():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    targets = make_targets()
    assert {"quickstart", "serve", "weights", "image", "image-test", "deploy", "fuzz"} <= set(targets)
    for target in targets:
        for cond in ("foo", "canny,foo"):
            done = subprocess.run(["make", target, f"COND={cond}"], cwd=ROOT, capture_output=True, text=True, env=env,
                                  timeout=60)
            assert done.returncode != 0 and done.stdout == "", (target, done.stdout)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and f"unknown COND={cond}" in lines[0], (target, done.stderr)
            assert all(f" {c}" in lines[0] for c in weights.IMAGES), lines[0]
    for cond in ("canny", "multi", "canny,seg"):  # known ones go through
        assert subprocess.run(["make", "-n", "fuzz", f"COND={cond}"], cwd=ROOT, capture_output=True, env=env).returncode == 0


def test_make_deploy_without_ref_says_what_to_pass_and_with_it_prints_the_next_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "REF", "TEMPLATE")}
    out = f"ARGS=--out {tmp_path}"
    refused = subprocess.run(["make", "-s", "deploy", "COND=hed", out], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=120)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "REF=<registry>/controlnet-hed:<tag>" in refused.stderr and "TEMPLATE=1" in refused.stderr
    assert not any(tmp_path.iterdir())  # nothing a cluster could not pull was written
    done = subprocess.run(["make", "-s", "deploy", "COND=hed", "REF=registry.example/controlnet-hed:1", out], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=120, check=True)
    assert "image: registry.example/controlnet-hed:1" in (tmp_path / "knative.yaml").read_text()
    for name in ("knative", "kserve", "kubernetes"):
        assert f"kubectl apply -f {tmp_path}/{name}.yaml" in done.stdout
    template = subprocess.run(["make", "-s", "deploy", "COND=hed", "TEMPLATE=1", out], cwd=ROOT, capture_output=True,
                              text=True, env=env, timeout=120, check=True)
    assert "These are a template" in template.stdout and "kubectl apply" in template.stdout
    assert "image: controlnet-hed\n" in (tmp_path / "knative.yaml").read_text()


def test_the_readme_predict_example_sends_the_sample_image_make_sample_image_writes():
    assert "make sample-image" in MAKEFILE and "--sample-only" in MAKEFILE
    predicts = re.findall(r"^make predict .*$", README, re.M)
    assert predicts and all("IMAGE=outputs/sample-input.png" in line for line in predicts), predicts
    assert "IMAGE=photo.png" not in README


# --- quiet output -------------------------------------------------------------------------------

NOISE = ("mediapipe", "Overwriting tiny_vit", "timm.models.layers is deprecated", "timm.models.registry",
         "should be kept in float32", "Token indices sequence length", "input was truncated")


def plain_env(**extra) -> dict:
    """A newcomer's shell: Python's default warning filters, not pytest's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return {**env, **extra}


def run_python(code: str) -> subprocess.CompletedProcess:
    env = plain_env()
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_importing_every_controlnet_aux_detector_prints_none_of_the_known_noise_but_our_warnings_show():
    done = run_python(
        "import warnings, models, models.detectors.hed, models.detectors.hough, models.detectors.pose\n"
        "warnings.warn('controlnet-cog canary')\n"
        # the same category from the same third-party module, another message: not ours to hide
        "warnings.warn_explicit('another controlnet_aux notice', UserWarning, 'x.py', 1, module='controlnet_aux.x')\n"
    )
    assert done.returncode == 0, done.stderr
    assert "controlnet-cog canary" in done.stderr and "another controlnet_aux notice" in done.stderr
    assert [n for n in NOISE if n in done.stderr] == []


def test_log_filters_drop_only_the_named_messages():
    import logging

    import models.quiet

    logger = logging.getLogger("diffusers.models.modeling_utils")
    record = lambda msg: logging.LogRecord(logger.name, logging.WARNING, "x", 1, msg, None, None)  # noqa: E731
    assert not logger.filter(record("There are modules in UNet2DConditionModel that should be kept in float32: []."))
    assert logger.filter(record("There are modules in UNet2DConditionModel that should be kept in float32: ['norm']."))
    assert logger.filter(record("something else entirely"))
    assert models.quiet.LOG_LINES  # the filters are installed by importing models


def test_tiny_weights_print_only_what_they_wrote(tmp_path):
    env = plain_env(CONTROLNET_WEIGHTS_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "weights.tiny"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert lines and [line for line in lines if not re.fullmatch(r"tiny [\w.-]+: written to .+", line)] == []


# --- tiny tokenizer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_weights):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_weights / "stable-diffusion-v1-5" / "tokenizer")


def test_tiny_tokenizer_reads_the_quickstarts_prompt_word_by_word(tokenizer):
    from cog_base.predictor import A_PROMPT, N_PROMPT

    prompt = "a cozy cottage with a red roof, photorealistic, golden hour, " + A_PROMPT
    for text in (prompt, N_PROMPT):
        tokens = tokenizer.tokenize(text)
        words = re.findall(r"[a-z]+|[^\sa-z]", text.lower())
        assert tokens == [w + "</w>" for w in words]  # as CLIP's BPE: a word, then punctuation
        assert len(tokenizer(text).input_ids) <= tokenizer.model_max_length
    # An unknown word still encodes, in pieces.
    assert "".join(tokenizer.tokenize("xylophone")).replace("</w>", "") == "xylophone"


def test_tiny_weights_from_an_older_generator_are_rewritten(tmp_path):
    folder = tmp_path / "sd-controlnet-canny"
    folder.mkdir()
    weights.write_marker(folder, tiny=True, component=folder.name)  # as generator 1 wrote it
    assert not weights.is_complete(folder, folder.name, tiny=True)
    weights.write_marker(folder, tiny=True, component=folder.name, generator=weights.TINY_GENERATOR)
    assert weights.is_complete(folder, folder.name, tiny=True)


# --- the README's curl example and the playground, against one real server -------------------------


@pytest.fixture(scope="module")
def canny(tmp_path_factory):
    with CogServer("canny", log_path=tmp_path_factory.mktemp("first-run") / "canny.log") as server:
        yield server


def readme_block(after: str) -> str:
    start = README.index(after)
    return re.search(r"```sh\n(.*?)```", README[start:], re.S).group(1)


def test_readme_curl_example_runs_as_written(canny):
    block = readme_block("Or with curl, while `make serve` runs")
    assert block.startswith("make sample-image") and "127.0.0.1:5000" in block
    for old in ROOT.glob("outputs/curl-*.png"):
        old.unlink()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.replace("127.0.0.1:5000", canny.url.removeprefix("http://"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout and "Using seed: 42" in done.stdout, done.stdout
    assert sorted(p.name for p in ROOT.glob("outputs/curl-*.png")) == ["curl-0.png", "curl-1.png"]
    assert [n for n in NOISE if n in canny.log()] == []


def test_make_predict_shows_progress_while_it_runs_and_a_busy_server_in_one_line(canny, tmp_path):
    from scripts.quickstart import sample_image

    image = sample_image(tmp_path / "house.png")
    command = [sys.executable, "-m", "scripts.predict", "--url", canny.url, "--image", str(image), "--prompt", "a house",
               "--out", str(tmp_path / "out"), "-i", "image_resolution=256"]
    # Long enough to be still running when its first step line arrives (logs travel in ~0.5 s batches): 20 tiny
    # steps took 1 s on an idle machine, done by then.
    running = subprocess.Popen([*command, "-i", "ddim_steps=100"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in running.stdout:
            lines.append(line)
            if re.match(r"step \d+/100", line):
                break
        # A step line is on the terminal while the prediction is still running.
        assert canny.health() == "BUSY", lines
        busy = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 1 and busy.stdout == ""
        assert busy.stderr.strip().count("\n") == 0 and "busy" in busy.stderr and "409" in busy.stderr, busy.stderr
        rest, _ = running.communicate(timeout=600)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 0, "".join(lines) + rest
    printed = "".join(lines) + rest
    steps = re.findall(r"^step (\d+)/100", printed, re.M)
    assert steps and len(steps) == len(set(steps))  # each line once, although every webhook carries all of them
    assert printed.count("Using seed:") == 1
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (tmp_path / "out").glob("*.png")) == ["1.png", "control.png"]


def test_server_start_up_says_ready_once_and_nothing_that_reads_as_an_error(canny):
    deadline = time.monotonic() + 30
    while f"READY on {canny.url}" not in canny.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = canny.log()
    assert log.count(f"READY on {canny.url}") == 1, log[-3000:]
    assert "fast loader failed" not in log and "Loading weights" not in log, log[-3000:]


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def in_viewport(page, selector: str) -> bool:
    """Wholly inside the window as it is now, without scrolling."""
    return page.evaluate("""s => { const r = document.querySelector(s).getBoundingClientRect();
        return r.width > 0 && r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth; }""", selector)


def no_horizontal_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= innerWidth")


def wait_idle_page(page):
    page.wait_for_function("!document.getElementById('run').disabled", timeout=300_000)


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on this machine (Debian: apt-get install chromium); .ci/run installs it")
def test_playground_in_a_headless_browser(canny, tmp_path):
    import requests
    from playwright.sync_api import sync_playwright

    from scripts.playground import Playground
    from scripts.quickstart import sample_image

    image = sample_image(tmp_path / "house.png")
    schema = requests.get(f"{canny.url}/openapi.json", timeout=10).json()["components"]["schemas"]["Input"]["properties"]
    shots = ROOT / "outputs"
    shots.mkdir(exist_ok=True)
    with Playground(canny.url, condition="canny") as page_server, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=find_chromium(), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = browser.new_page()
            page.goto(page_server.url)
            page.wait_for_selector("#in-prompt")
            assert page.text_content("#condition") == "canny" and "canny" in page.title()
            # Every served input has a field, with the served default.
            for name, prop in schema.items():
                assert page.locator(f"#in-{name}").count() == 1, name
            assert page.input_value("#in-ddim_steps") == str(schema["ddim_steps"]["default"])
            for name in [n for n, p in schema.items() if p.get("type") == "boolean"]:
                assert page.is_checked(f"#in-{name}") is schema[name]["default"], name
            assert float(page.locator("#in-low_threshold").get_attribute("max")) == schema["low_threshold"]["maximum"]
            # Image, prompt and Run first; jagilley's inputs open; every other input folded in a group.
            assert in_viewport(page, "#in-image") and in_viewport(page, "#in-prompt") and in_viewport(page, "#run")
            order = page.evaluate("[...document.querySelectorAll('#in-image, #in-prompt, #run, #groups')].map(e => e.id)")
            assert order == ["in-image", "in-prompt", "run", "groups"]
            basics = {"num_samples", "image_resolution", "ddim_steps", "scale", "seed", "eta", "a_prompt", "n_prompt",
                      "low_threshold", "high_threshold"}
            groups = {}
            for name in schema.keys() - {"image", "prompt"}:
                group = page.evaluate(f"document.getElementById('in-{name}').closest('details').id")
                groups.setdefault(group, set()).add(name)
                assert page.is_visible(f"#in-{name}") is (name in basics), (name, group)
            assert groups["group-basics"] == basics and "group-more" not in groups  # canny has nothing unplaced
            assert {"guess_mode", "controlnet_conditioning_scale"} <= groups["group-control"]
            assert groups["group-sampler"] == {"scheduler"} and "lora_url" in groups["group-style"]
            assert {"return_control_map", "width"} <= groups["group-output"]
            # Names that other images serve land by rule: the multi image's units, and anything new.
            assert page.evaluate("['controlnet_2_image', 'controlnet_3_image_is_map', 'mask_image', 'brand_new']"
                                 ".map(n => groupOf(n).id)") == ["units", "units", "editing", "more"]
            page.click("#group-control summary")
            assert page.is_visible("#in-guess_mode")

            page.set_input_files("#in-image", str(image))
            page.fill("#in-prompt", "a cozy cottage with a red roof")
            # Refused by the server: its own message on the page, no images.
            page.fill("#in-ddim_steps", "0")
            page.evaluate("document.getElementById('in-ddim_steps').removeAttribute('min')")
            page.click("#run")
            page.wait_for_selector("#status.failed")
            assert page.text_content("#status").startswith("Refused (HTTP 422)") and "ddim_steps" in page.text_content("#status")
            assert page.locator("figure img").count() == 0

            # Progress while it runs: every status line the page shows is recorded.
            page.evaluate("""window.seen = []; new MutationObserver(() => window.seen.push(
                document.getElementById('status').textContent)).observe(document.getElementById('status'),
                {childList: true, characterData: true, subtree: true})""")
            page.select_option("#in-image_resolution", "256")
            # Long enough for a progress line to reach the page (logs travel in ~0.5 s batches): 20 tiny steps
            # took 0.8 s on an idle machine, done before the first batch.
            page.fill("#in-ddim_steps", "100")
            page.click("#run")
            page.wait_for_selector("figure img.sample", timeout=300_000)
            progress = [line for line in page.evaluate("window.seen") if re.search(r"step \d+/100", line)]
            assert progress, page.evaluate("window.seen")
            assert page.locator("figure img.control").count() == 1 and page.locator("figure img.sample").count() == 1
            page.wait_for_function("[...document.querySelectorAll('figure img')].every(i => i.complete && i.naturalWidth > 0)",
                                   timeout=30_000)
            assert page.locator("figcaption").all_text_contents() == ["control map", "sample 1"]
            # The outcome is in view without scrolling, on a page that has not scrolled.
            assert page.evaluate("scrollY") == 0 and in_viewport(page, "#status") and in_viewport(page, "figure img.sample")
            seed = re.fullmatch(r"Seed: (\d+)", page.text_content("#seed")).group(1)
            assert f"Using seed: {seed}" in page.text_content("#logs")
            first = page.get_attribute("figure img.sample", "src")
            page.screenshot(path=str(shots / "playground-1280x800.png"))

            page.evaluate("document.getElementById('images').textContent = ''")
            page.click("#again")
            page.wait_for_selector("figure img.sample", timeout=300_000)
            assert page.text_content("#seed") == f"Seed: {seed}"
            assert page.get_attribute("figure img.sample", "src") == first  # same seed, same sample

            # Without the control map the only image is the sample, and says so.
            page.click("#group-output summary")
            page.uncheck("#in-return_control_map")
            page.select_option("#in-image_resolution", "256")
            page.fill("#in-ddim_steps", "2")
            page.evaluate("document.getElementById('images').textContent = ''")
            page.click("#run")
            page.wait_for_selector("figure img", timeout=300_000)
            assert page.locator("figcaption").all_text_contents() == ["sample 1"]
            assert page.locator("figure img.sample").count() == 1 and page.locator("figure img.control").count() == 0
            page.check("#in-return_control_map")

            # Cancel ends the running prediction through Cog's cancel.
            page.select_option("#in-image_resolution", "768")
            page.fill("#in-ddim_steps", "100")
            page.click("#run")
            page.wait_for_function("/step \\d+\\/100/.test(document.getElementById('status').textContent)", timeout=300_000)
            page.click("#cancel")
            page.wait_for_selector("#status.canceled", timeout=60_000)
            assert page.text_content("#status").startswith("canceled")
            wait_idle_page(page)

            # A phone: one readable column, no horizontal scrolling, Run in the first screen, the outcome in view.
            page.set_viewport_size({"width": 390, "height": 844})
            page.goto(page_server.url)
            page.wait_for_selector("#in-prompt")
            assert in_viewport(page, "#run") and no_horizontal_scroll(page)
            page.set_input_files("#in-image", str(image))
            page.fill("#in-prompt", "a cozy cottage with a red roof")
            page.select_option("#in-image_resolution", "256")
            page.fill("#in-ddim_steps", "2")
            page.click("#run")
            page.wait_for_selector("figure img.sample", timeout=300_000)
            wait_idle_page(page)
            page.wait_for_function("[...document.querySelectorAll('figure img')].every(i => i.complete && i.naturalWidth > 0)",
                                   timeout=30_000)
            assert page.text_content("#status").startswith("Done") and in_viewport(page, "#status")
            assert no_horizontal_scroll(page)
            width = page.evaluate("document.querySelector('figure img.sample').getBoundingClientRect().width")
            assert width >= 300  # the column's width, not a shrunken desktop page
            page.screenshot(path=str(shots / "playground-390x844.png"))
        finally:
            browser.close()


def test_sigterm_stops_the_playground_and_its_cog_server(tmp_path):
    """SIGTERM (systemd, docker, timeout) must not orphan the Cog server, which runs in its own session."""
    import psutil

    from scripts.cog_server import free_port, group_alive
    from scripts.serve import port_problem

    page_port, cog_port = free_port(), free_port()
    playground = subprocess.Popen(
        [sys.executable, "-m", "scripts.playground", "--cond", "canny", "--port", str(page_port), "--cog-port", str(cog_port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    cog = None
    try:
        for line in playground.stdout:
            if line.startswith("Cog server:"):
                assert f"127.0.0.1:{cog_port}" in line  # --cog-port (make's PORT) honoured
            if line.startswith("Playground:"):
                break
        (cog,) = psutil.Process(playground.pid).children()
        assert group_alive(cog.pid)
        playground.send_signal(signal.SIGTERM)
        assert playground.wait(timeout=60) == 0
        deadline = time.monotonic() + 20
        while group_alive(cog.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(cog.pid), "the Cog server outlived its playground"
        assert port_problem(cog_port) is None and port_problem(page_port) is None
    finally:
        if playground.poll() is None:
            playground.kill()
        if cog is not None and group_alive(cog.pid):
            os.killpg(cog.pid, signal.SIGKILL)
