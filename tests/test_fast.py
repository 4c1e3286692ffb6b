"""The fast path (models/fast.py) gives the plain path's output for a seed, on the tiny pipeline on CPU.

The exact options (on by default) give bit-identical samples, and each is shown to be active (the
work it saves is counted). The others: at most 2/255 per pixel (uint8 PNG values) and a mean of at
most 0.5/255; vae_guard and channels_last are exact up to float reordering; compile may fuse ops
differently.
"""

import os

import numpy as np
import pytest
import torch

import weights
from models import fast
from models.detectors.canny import CannyDetector
from models.image import target_size
from models.pipeline import ControlNetRunner, Request, load_pipeline

from conftest import data_uri, decode, drawing, png_bytes, random_lora

MAX_DIFF, MEAN_DIFF = 2, 0.5


def runner(options=(), log=print):
    ws = weights.locate("canny", "tiny")
    pipe = load_pipeline(ws.base, ws.controlnet, device="cpu")
    fast.apply(pipe, options, log=log)
    return ControlNetRunner(pipe, CannyDetector.from_weights(None), detect_at_resolution=False)


def sample(run, seed=7, num_samples=1, negative="lowres, bad anatomy", guess=False):
    rgb = np.asarray(drawing())
    control = run.control_map(rgb, target_size(*rgb.shape[:2], 256), 512)
    result = run.generate(control, Request(prompt="a house", negative_prompt=negative, num_samples=num_samples,
                                           steps=2, guidance_scale=9.0, eta=0.0, seed=seed, guess_mode=guess))
    return np.stack([np.asarray(img, dtype=np.int16) for img in result.samples])


def assert_close(a, b):
    diff = np.abs(a - b)
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())


@pytest.fixture(scope="module")
def plain():
    return runner()


def test_options_parse_and_bad_names_are_refused():
    assert fast.options_from_env("") == fast.EXACT  # unset: the exact ones
    assert fast.options_from_env("off") == ()
    assert fast.options_from_env("all") == fast.OPTIONS
    assert fast.options_from_env("compile, negcache") == fast.EXACT + ("compile",)
    with pytest.raises(ValueError, match="unknown option.*cudagraph"):
        fast.options_from_env("negcache,cudagraph")


def test_eager_fast_path_matches_plain_and_encodes_the_negative_prompt_once(plain):
    quick = runner(("negcache", "vae_guard", "channels_last"))
    first = sample(quick, 7, 1)
    assert_close(first, sample(plain, 7, 1))
    assert_close(sample(quick, 8, 2), sample(plain, 8, 2))
    cache = quick.pipe.encode_prompt.cache
    assert cache.cache_info().misses == 1 and cache.cache_info().hits == 1
    # A different negative prompt is a different embedding, not a stale one.
    other = sample(quick, negative="blurry")
    assert_close(other, sample(plain, negative="blurry"))
    assert np.abs(other - first).max() > MAX_DIFF


# -- the exact options (the default): bit-identical, each doing its work once -----------------------

@pytest.fixture(scope="module")
def exact():
    return runner(fast.EXACT)


def counting(monkeypatch, owner, name, keep=lambda *args: True):
    """The calls of owner.name (those `keep` accepts), recorded while the test runs."""
    calls, original = [], getattr(owner, name)

    def counted(*args, **kwargs):
        if keep(*args):
            calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_the_exact_options_give_bit_identical_samples_and_each_does_its_work_once(plain, exact, monkeypatch):
    import inspect

    from diffusers.hooks import group_offloading
    from diffusers.models.attention_processor import AttnProcessor2_0

    walks = counting(monkeypatch, group_offloading, "_get_top_level_group_offload_hook")
    attention_signatures = counting(monkeypatch, inspect, "signature",
                                    lambda fn, *a: isinstance(getattr(fn, "__self__", None), AttnProcessor2_0))
    embedding = exact.pipe.controlnet.controlnet_cond_embedding
    steps = 2  # sample()'s
    sample(exact)  # the processors' parameter names are computed once per process, on first use
    for seed, num_samples in ((7, 1), (8, 2)):
        walks.clear(), attention_signatures.clear()
        reference = sample(plain, seed, num_samples)
        assert walks and attention_signatures  # what the plain path repeats on every request
        walks.clear(), attention_signatures.clear()
        computed, hits = embedding.computed, embedding.hits
        assert np.array_equal(sample(exact, seed, num_samples), reference)
        assert not walks and not attention_signatures
        # One embedding of the control image per request, read by every step.
        assert (embedding.computed - computed, embedding.hits - hits) == (1, steps - 1)
    assert exact.pipe.encode_prompt.cache.cache_info().hits >= 1
    # Guess mode (no guidance on the ControlNet: its image is not doubled) likewise.
    assert np.array_equal(sample(exact, guess=True), sample(plain, guess=True))


def text_encoder_lora(pipe) -> dict:
    return random_lora(pipe.text_encoder, "text_encoder", ("self_attn.q_proj", "self_attn.v_proj"),
                       torch.Generator().manual_seed(5))


def test_the_negative_cache_is_never_stale_when_a_lora_or_an_embedding_changes_the_text_encoder(plain, exact):
    negative = "lowres, <bad-style>"
    cache = exact.pipe.encode_prompt.cache
    base = sample(exact, negative=negative)
    runs = (plain, exact)
    try:
        for run in runs:
            run.pipe.load_lora_weights(text_encoder_lora(run.pipe), adapter_name="text")
        with_lora = sample(exact, negative=negative)
        assert np.array_equal(with_lora, sample(plain, negative=negative))
        assert not np.array_equal(with_lora, base)
    finally:
        for run in runs:
            run.pipe.unload_lora_weights()
    width = exact.pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    vectors = torch.randn(1, width, generator=torch.Generator().manual_seed(6)) * 3
    try:
        for run in runs:
            run.pipe.load_textual_inversion({"emb_params": vectors}, token="<bad-style>")
        with_embedding = sample(exact, negative=negative)
        assert np.array_equal(with_embedding, sample(plain, negative=negative))
        assert not np.array_equal(with_embedding, base)
    finally:
        for run in runs:
            run.pipe.unload_textual_inversion()
    # Back to the base model: the cached embedding serves again, still the right one.
    misses = cache.cache_info().misses
    assert np.array_equal(sample(exact, negative=negative), base)
    assert cache.cache_info().misses == misses


def test_a_controlnet_loaded_on_first_use_gets_the_per_model_options(plain, exact):
    from models.control import Condition, ControlNets, ControlUnit
    from models.pipeline import load_controlnet

    ws = weights.locate("canny", "tiny")
    rgb = np.asarray(drawing())
    size = target_size(*rgb.shape[:2], 256)
    results = []
    for run, prepare in ((plain, None), (exact, fast.per_model(fast.EXACT))):
        store = ControlNets(lambda folder: load_controlnet(folder, "cpu"))
        if prepare:
            store.prepare = prepare
        run.controlnets = store
        # The same ControlNet as a second unit, loaded by the store: two ControlNets, one request.
        later = Condition("later", run.condition.load_detector, False, controlnet=ws.controlnet)
        units = [ControlUnit(c, map=run.control_map(rgb, size, 512), strength=s) for c, s in
                 ((run.condition, 1.0), (later, 0.5))]
        results.append(np.stack([np.asarray(img, dtype=np.int16) for img in run.generate(units, Request(
            prompt="a house", negative_prompt="lowres", steps=2, seed=3)).samples]))
        run.controlnets = None
    assert np.array_equal(*results)
    loaded = store.get([ws.controlnet])[0]
    assert loaded.controlnet_cond_embedding.computed == 1 and loaded.controlnet_cond_embedding.hits == 1


def test_vae_nan_falls_back_to_float32_and_says_so(plain):
    logs = []
    guarded = runner(("vae_guard",), log=logs.append)
    vae = guarded.pipe.vae.to(torch.bfloat16)
    # Stand-in for an fp16 overflow: the decoder gives NaN whenever it runs in reduced precision.
    vae.decoder.register_forward_hook(lambda m, i, out: out * torch.nan if out.dtype != torch.float32 else out)
    out = sample(guarded)
    assert vae.dtype == torch.float32 and any("NaN" in line and "float32" in line for line in logs)
    assert_close(out, sample(plain))


# Inductor on 2 CPU cores takes minutes: `make test-compile` runs it (CONTROLNET_TEST_COMPILE=1).
@pytest.mark.skipif(not os.environ.get("CONTROLNET_TEST_COMPILE"), reason="set CONTROLNET_TEST_COMPILE=1 (make test-compile)")
def test_compiled_fast_path_matches_plain(plain):
    assert_close(sample(runner(fast.OPTIONS)), sample(plain))


# -- through the server: setup() applies CONTROLNET_FAST --------------------------------------------

def served_request():
    return {"image": data_uri(png_bytes(drawing())), "prompt": "a house", "image_resolution": "256",
            "ddim_steps": 2, "seed": 11}


def served_samples(body):
    assert body["status"] == "succeeded", body.get("error")
    return np.stack([np.asarray(decode(uri), dtype=np.int16) for uri in body["output"][1:]])


def test_the_server_serves_the_fast_path_it_is_asked_for_with_the_same_images(servers, tmp_path):
    from scripts.cog_server import CogServer

    request = served_request()
    plain_body = servers["canny"].predict(request).json()
    with CogServer("canny", env={"CONTROLNET_FAST": "vae_guard,channels_last"},
                   log_path=tmp_path / "fast.log") as quick:
        assert "fast path: device_once, negcache, cond_once, attn_direct, vae_guard, channels_last" in quick.log()
        assert_close(served_samples(quick.predict(request).json()), served_samples(plain_body))
    assert "fast path: device_once, negcache, cond_once, attn_direct\n" in servers["canny"].log()  # the default
    with pytest.raises(RuntimeError, match=r"CONTROLNET_FAST: unknown option\(s\) cudagraph"):
        CogServer("canny", env={"CONTROLNET_FAST": "cudagraph"}, log_path=tmp_path / "bad.log").start()


@pytest.mark.skipif(not os.environ.get("CONTROLNET_TEST_COMPILE"), reason="set CONTROLNET_TEST_COMPILE=1 (make test-compile)")
def test_a_compiled_server_warms_up_in_setup_and_serves_the_same_images(servers, tmp_path):
    from scripts.cog_server import CogServer

    request = served_request()
    plain_body = servers["canny"].predict(request).json()
    # The drawing (400x300) at image_resolution 256 is generated at 320x256.
    env = {"CONTROLNET_FAST": "all", "CONTROLNET_WARMUP": "320x256:1", "CONTROLNET_COMPILE_CACHE": str(tmp_path / "inductor")}
    with CogServer("canny", env=env, log_path=tmp_path / "compiled.log") as compiled:
        assert "compiled for 320x256:1 in" in compiled.log()
        body = compiled.predict(request).json()
    assert_close(served_samples(body), served_samples(plain_body))
    assert any((tmp_path / "inductor").iterdir())  # the cache a restarted container would reuse
