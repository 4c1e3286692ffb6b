"""LoRA and textual inversion per request, a fine-tuned base at setup, and bad assets, on tiny models.

The LoRAs (diffusers/PEFT and kohya key formats) and the embedding are made here for the tiny UNet and
text encoder, and served from a local HTTP server on 127.0.0.1, as a user's file host would serve them.
"""

import base64
import http.server
import shutil
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file

from models.assets import AssetCache, AssetError
from tests.conftest import predictor_class, setup_with

FAST = dict(ddim_steps=2, image_resolution="256", seed=21)
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


class Host:
    """A file host on loopback that counts requests per path and can hang."""

    def __init__(self, folder):
        self.folder, self.hits = folder, {}
        host = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(folder), **kw)

            def do_GET(self):
                host.hits[self.path] = host.hits.get(self.path, 0) + 1
                if self.path.startswith("/hang"):
                    time.sleep(30)
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture(scope="module")
def canny(tmp_path_factory):
    import os

    os.environ["CONTROLNET_ASSET_CACHE"] = str(tmp_path_factory.mktemp("asset-cache"))
    p = predictor_class("canny")()
    p.setup()
    return p


@pytest.fixture(scope="module")
def host(tmp_path_factory, canny):
    folder = tmp_path_factory.mktemp("host")
    unet = canny.runner.pipe.unet
    names = [n for n, _ in unet.named_modules() if n.endswith(ATTENTION) and ".attn" in n]
    g = torch.Generator().manual_seed(3)

    def lora(fmt, gain):
        state = {}
        for name in names:
            layer = unet.get_submodule(name)
            down = torch.randn(4, layer.in_features, generator=g) * gain
            up = torch.randn(layer.out_features, 4, generator=g) * gain
            if fmt == "peft":
                state |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
            else:
                key = "lora_unet_" + name.replace(".", "_")
                state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)}
        return state

    save_file(lora("peft", 1.0), folder / "style-a.safetensors")
    save_file(lora("kohya", 1.0), folder / "style-b-kohya.safetensors")
    # SDXL's UNet has blocks and widths SD 1.5's has not.
    save_file({"unet.down_blocks.1.attentions.1.transformer_blocks.5.attn1.to_q.lora_A.weight": torch.randn(4, 640),
               "unet.down_blocks.1.attentions.1.transformer_blocks.5.attn1.to_q.lora_B.weight": torch.randn(640, 4)},
              folder / "sdxl-lora.safetensors")
    width = canny.runner.pipe.text_encoder.config.hidden_size
    save_file({"emb_params": torch.randn(1, width, generator=g) * 3}, folder / "embedding.safetensors")
    Image.new("RGB", (8, 8)).save(folder / "not-a-lora.png")
    (folder / "big.safetensors").write_bytes(b"\0" * (3 * 2**20))
    return Host(folder)


@pytest.fixture(scope="module")
def baseline(canny, tmp_path_factory):
    """An input and the samples the stock pipeline makes of it, before any asset was used."""
    from tests.conftest import drawing

    path = tmp_path_factory.mktemp("baseline") / "input.png"
    drawing().save(path)
    return path, sample(canny, path)


def sample(predictor, image, prompt="a house", **kwargs) -> np.ndarray:
    files = predictor.generate(image, prompt, **(FAST | kwargs))
    return np.asarray(Image.open(files[-1])).astype(np.int16)


def mean_diff(a, b) -> float:
    return float(np.abs(a - b).mean())


def lora_layers(pipe) -> int:
    return sum(1 for name, _ in pipe.unet.named_modules() if "lora_A" in name)


def test_lora_changes_the_output_grows_with_scale_and_scale_zero_is_none(canny, host, image_file):
    path = image_file()
    base = sample(canny, path)
    url = host.url("style-a.safetensors")
    zero = sample(canny, path, lora_url=url, lora_scale=0.0)
    one = sample(canny, path, lora_url=url, lora_scale=1.0)
    two = sample(canny, path, lora_url=url, lora_scale=2.0)
    assert np.abs(zero - base).max() <= 1
    assert mean_diff(two, base) > mean_diff(one, base) > 0.5


def test_kohya_lora_and_switching_leave_one_lora_loaded(canny, host, image_file):
    path = image_file()
    a = sample(canny, path, lora_url=host.url("style-a.safetensors"))
    b = sample(canny, path, lora_url=host.url("style-b-kohya.safetensors"))
    assert mean_diff(a, b) > 0.5
    assert canny.runner.pipe.get_list_adapters() == {"unet": ["request"]}
    a_again = sample(canny, path, lora_url=host.url("style-a.safetensors"))
    np.testing.assert_array_equal(a, a_again)


def test_no_lora_after_a_lora_is_bit_identical_to_never_having_one(image_file, host, tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLNET_ASSET_CACHE", str(tmp_path / "cache"))
    fresh = predictor_class("canny")()
    fresh.setup()
    path = image_file()
    before = sample(fresh, path)
    sample(fresh, path, lora_url=host.url("style-a.safetensors"))
    sample(fresh, path, lora_url=host.url("style-b-kohya.safetensors"))
    after = sample(fresh, path)
    np.testing.assert_array_equal(before, after)
    assert lora_layers(fresh.runner.pipe) == 0


def test_a_repeated_url_is_not_downloaded_again(canny, host, image_file):
    (host.folder / "once.safetensors").write_bytes((host.folder / "style-a.safetensors").read_bytes())
    url = host.url("once.safetensors")
    sample(canny, image_file(), lora_url=url)
    sample(canny, image_file())  # unloads it
    sample(canny, image_file(), lora_url=url)
    assert host.hits["/once.safetensors"] == 1


@pytest.mark.parametrize("bad", [b"not a safetensors file", "sdxl-lora.safetensors"])
def test_a_file_that_failed_is_fetched_again_once_fixed(canny, host, image_file, bad):
    """The cache kept a failed file under its URL, so fixing the file at the same URL still failed."""
    name = f"fixed-later-{len(host.hits)}.safetensors"
    (host.folder / name).write_bytes(bad if isinstance(bad, bytes) else (host.folder / bad).read_bytes())
    with pytest.raises(ValueError, match="not a .safetensors file|not a LoRA"):
        sample(canny, image_file(), lora_url=host.url(name))
    (host.folder / name).write_bytes((host.folder / "style-a.safetensors").read_bytes())
    with_lora = sample(canny, image_file(), lora_url=host.url(name))
    assert mean_diff(with_lora, sample(canny, image_file())) > 0.5 and host.hits[f"/{name}"] == 2


def test_a_lora_as_data_uri(canny, host, image_file):
    raw = (host.folder / "style-a.safetensors").read_bytes()
    uri = "data:application/octet-stream;base64," + base64.b64encode(raw).decode()
    by_uri = sample(canny, image_file(), lora_url=uri)
    by_url = sample(canny, image_file(), lora_url=host.url("style-a.safetensors"))
    np.testing.assert_array_equal(by_uri, by_url)


def test_the_embedding_changes_the_output_only_when_the_prompt_uses_its_token(canny, host, image_file):
    path = image_file()
    emb = dict(embedding_url=host.url("embedding.safetensors"), embedding_token="<cottage>")
    plain = sample(canny, path, "a house")
    unused = sample(canny, path, "a house", **emb)
    used = sample(canny, path, "a <cottage> house", **emb)
    np.testing.assert_array_equal(plain, unused)
    assert mean_diff(used, plain) > 0.1  # the tiny text encoder steers weakly: changing a word moves ~0.2
    vocabulary = len(canny.runner.pipe.tokenizer)
    np.testing.assert_array_equal(plain, sample(canny, path, "a house"))
    assert len(canny.runner.pipe.tokenizer) == vocabulary  # the token was removed again


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("not-a-lora.png", {}, "not a .safetensors file"),
        ("sdxl-lora.safetensors", {}, "not a LoRA for Stable Diffusion 1.5"),
        ("missing.safetensors", {}, "answered HTTP 404"),
        ("big.safetensors", {}, "send at most 1 MiB"),
        ("hang", {}, "did not answer in time"),
        ("embedding.safetensors", {"embedding_token": "a"}, "embedding_token 'a' is a word the model already knows"),
    ],
)
def test_bad_assets_fail_with_what_to_send_and_leave_the_server_unaffected(canny, host, baseline, name, kwargs, message):
    path, before = baseline
    canny.assets.max_file_bytes, canny.assets.timeout_s = 2**20, 2.0
    field = "embedding_url" if kwargs else "lora_url"
    try:
        started = time.monotonic()
        with pytest.raises(ValueError, match=message) as error:
            canny.generate(path, "a house", **FAST, **{field: host.url(name)}, **kwargs)
        assert time.monotonic() - started < 20
        assert str(host.folder) not in str(error.value)
    finally:
        canny.assets.max_file_bytes, canny.assets.timeout_s = 2**30, 120.0
    np.testing.assert_array_equal(before, sample(canny, path))
    assert lora_layers(canny.runner.pipe) == 0


def as_uri(state: dict) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(save(state)).decode()


def filled_lora(canny, value: float) -> dict:
    unet = canny.runner.pipe.unet
    state = {}
    for name in [n for n, _ in unet.named_modules() if n.endswith(ATTENTION) and ".attn" in n][:4]:
        layer = unet.get_submodule(name)
        state[f"unet.{name}.lora_A.weight"] = torch.full((4, layer.in_features), value)
        state[f"unet.{name}.lora_B.weight"] = torch.full((layer.out_features, 4), value)
    return state


def embedding(canny, shape=None, value=None, width_extra=0, **tensors) -> dict:
    width = canny.runner.pipe.text_encoder.config.hidden_size
    if tensors:
        return {key: torch.randn(n, width if n else 1280) for key, n in tensors.items()}
    tensor = torch.randn(*(shape or (1,)), width + width_extra)
    return {"emb_params": tensor.fill_(value) if value is not None else tensor}


BAD_FILES = {
    "NaN LoRA": (lambda c: {"lora_url": as_uri(filled_lora(c, float("nan")))},
                 "lora_url holds non-finite values (NaN or infinity) in 'unet."),
    "1e30 LoRA": (lambda c: {"lora_url": as_uri(filled_lora(c, 1e30))}, "lora_url holds values up to 1e+30 in"),
    "all-NaN embedding": (lambda c: {"embedding_url": as_uri(embedding(c, value=float("nan")))},
                          "embedding_url holds non-finite values (NaN or infinity) in 'emb_params'"),
    "3-D embedding": (lambda c: {"embedding_url": as_uri(embedding(c, shape=(1, 2)))},
                      "embedding_url's tensor is 3-dimensional (1 x 2 x 32); an embedding is one tensor of n x 32 "
                      "values (SD 1.5 embeddings are 768 wide)"),
    "wrong-width embedding": (lambda c: {"embedding_url": as_uri(embedding(c, shape=(2,), width_extra=8))},
                              "embedding_url's vectors are 40 wide; this model's text encoder takes vectors 32 wide"),
    "two-key (SDXL) embedding": (lambda c: {"embedding_url": as_uri(embedding(c, clip_l=1, clip_g=0))},
                                 "embedding_url holds 2 tensors ('clip_g', 'clip_l': an SDXL embedding)"),
    "integer embedding": (lambda c: {"embedding_url": as_uri({"emb_params": torch.ones(1, 32, dtype=torch.int64)})},
                          "holds int64 values"),
    "5,000-vector embedding": (lambda c: {"embedding_url": as_uri(embedding(c, shape=(5000,)))},
                               "embedding_url holds 5000 vectors; send 1 to 75"),
}


def test_damaged_or_misshapen_files_are_refused_in_the_clients_terms(canny, baseline):
    path, before = baseline
    for name, (make, message) in BAD_FILES.items():
        inputs = make(canny)
        if "embedding_url" in inputs:
            inputs["embedding_token"] = "<x>"
        started = time.monotonic()
        with pytest.raises(ValueError) as error:
            canny.generate(path, "a <x> house", **FAST, **inputs)
        assert message in str(error.value), name
        assert time.monotonic() - started < 20, name
        assert "tensor(" not in str(error.value) and "{" not in str(error.value), name  # no tensor, no template
    np.testing.assert_array_equal(before, sample(canny, path))  # and nothing of them stayed
    assert lora_layers(canny.runner.pipe) == 0


def test_an_embedding_of_many_vectors_within_the_bound_is_used(canny, baseline):
    path, before = baseline
    emb = {"embedding_url": as_uri(embedding(canny, shape=(75,))), "embedding_token": "<many>"}
    vocabulary = len(canny.runner.pipe.tokenizer)
    used = sample(canny, path, "a <many> house", **emb)
    assert mean_diff(used, before) > 0.1
    assert len(canny.runner.pipe.tokenizer) == vocabulary


def test_an_embedding_grows_the_token_table_without_drawing_rows_it_overwrites(canny, baseline, monkeypatch):
    """transformers' default mean_resizing fits a multivariate normal to the whole table (seconds at SD
    1.5's 49408 x 768) for rows the embedding then overwrites: same output without it."""
    path, _ = baseline
    encoder = canny.runner.pipe.text_encoder
    seen, resize = [], type(encoder).resize_token_embeddings

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("mean_resizing", True))
        return resize(self, *args, **kwargs)

    def as_transformers_default(self, new_num_tokens, **kwargs):
        return resize(self, new_num_tokens, mean_resizing=True)

    emb = {"embedding_url": as_uri(embedding(canny, shape=(2,))), "embedding_token": "<plain>"}
    monkeypatch.setattr(type(encoder), "resize_token_embeddings", spy)
    plain = sample(canny, path, "a <plain> house", **emb)
    assert seen == [False]
    monkeypatch.setattr(type(encoder), "resize_token_embeddings", as_transformers_default)
    drawn = sample(canny, path, "a <plain> house", **emb)
    assert np.array_equal(plain, drawn)
    assert "resize_token_embeddings" not in vars(encoder)  # the class's own method again


def test_a_file_that_makes_the_output_non_finite_is_blamed_not_the_server(canny, baseline, monkeypatch):
    """A LoRA within the value bound can still be too strong: the message names it, as an input error."""
    import models.pipeline

    path, _ = baseline
    def non_finite(tensor, stage):
        raise models.pipeline.NonFiniteOutputError(f"the model produced non-finite values (NaN/inf) during {stage}; "
                                                   "this is a numerical fault of the server")

    monkeypatch.setattr(models.pipeline, "check_finite", non_finite)
    with pytest.raises(ValueError, match="non-finite values .* with this request's lora_url, the likely cause: try a "
                                         "lower lora_scale"):
        canny.generate(path, "a house", **FAST, lora_url=as_uri(filled_lora(canny, 0.01)))
    from cog_base.predictor import ExpectedFault

    with pytest.raises(ExpectedFault, match="numerical fault of the server"):
        canny.generate(path, "a house", **FAST)


def test_what_reaches_a_client_of_the_real_server_holds_no_traceback_or_path(canny, tmp_path):
    """Cog's worker printed a traceback into `logs` for every failure that was not a ValueError, and
    Python's warning lines name Pillow's file on the server."""
    import io

    from scripts.cog_server import CogServer
    from tests.conftest import data_uri, drawing, png_bytes

    exif = io.BytesIO()  # an IFD that claims five entries and holds one: Pillow warns
    drawing().save(exif, "PNG", exif=b"MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01\x00\x01\x00\x00")
    base = {"image": data_uri(png_bytes(drawing())), "prompt": "a <x> house", "ddim_steps": 1,
            "image_resolution": "256", "seed": 1}
    cases = [
        ({"lora_url": as_uri(filled_lora(canny, float("nan")))}, "failed", "lora_url holds non-finite values"),
        ({"embedding_url": as_uri(embedding(canny, shape=(1, 2))), "embedding_token": "<x>"}, "failed",
         "embedding_url's tensor is 3-dimensional"),
        ({"image": data_uri(exif.getvalue())}, "succeeded", "Note: the image's metadata is malformed and was ignored"),
    ]
    with CogServer("canny", log_path=tmp_path / "server.log",
                   env={"CONTROLNET_ASSET_CACHE": str(tmp_path / "cache")}) as server:
        for inputs, status, message in cases:
            body = server.predict({**base, **inputs}).json()
            assert body["status"] == status, body.get("error")
            assert message in (body.get("error") or "") + body["logs"]
            assert "Traceback" not in body["logs"] and ".py" not in body["logs"] and "/tmp" not in body["logs"]
        assert server.health() == "READY"


def test_embedding_url_needs_its_token(canny, host, image_file):
    with pytest.raises(ValueError, match="embedding_url and embedding_token go together"):
        canny.generate(image_file(), "a house", embedding_url=host.url("embedding.safetensors"), **FAST)


def test_asset_cache_evicts_the_least_recently_used(tmp_path):
    cache = AssetCache(tmp_path, max_bytes=2500)

    def uri(fill):
        return "data:;base64," + base64.b64encode(bytes([fill]) * 1000).decode()

    first = cache.fetch(uri(1), "x")
    second = cache.fetch(uri(2), "x")
    time.sleep(0.01)
    cache.fetch(uri(1), "x")  # used again: now the most recent
    time.sleep(0.01)
    third = cache.fetch(uri(3), "x")
    assert first.exists() and third.exists() and not second.exists()
    with pytest.raises(AssetError, match="http"):
        cache.fetch("/etc/passwd", "lora_url")


# -- a fine-tuned base at setup ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, canny):
    """The tiny base with a retrained UNet, as a diffusers folder, packed as a tar."""
    folder = tmp_path_factory.mktemp("finetuned") / "my-model"
    unet = canny.runner.pipe.unet
    tuned = type(unet).from_config(unet.config)
    torch.manual_seed(99)
    tuned.save_pretrained(folder / "unet")
    archive = folder.parent / "my-model.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="my-model")
    return archive


def test_a_fine_tuned_base_replaces_the_unet_and_keeps_the_controlnet(monkeypatch, tmp_path, canny, finetuned, host, image_file, capsys):
    path = image_file()
    stock = sample(canny, path)
    shutil.copy(finetuned, host.folder / "my-model.tar")
    for source in (finetuned, host.url("my-model.tar")):
        tuned = setup_with(monkeypatch, tmp_path, source)
        log = capsys.readouterr().out
        assert "base from COG_WEIGHTS (my-model.tar)" in log and str(tmp_path) not in log
        assert mean_diff(sample(tuned, path), stock) > 0.5
        assert tuned.runner.pipe.controlnet.config == canny.runner.pipe.controlnet.config
    np.testing.assert_array_equal(sample(setup_with(monkeypatch, tmp_path, None), path), stock)


def test_a_base_that_is_not_a_checkpoint_fails_setup_clearly(monkeypatch, tmp_path, host):
    with pytest.raises(ValueError, match="not a .safetensors file"):
        setup_with(monkeypatch, tmp_path, host.folder / "not-a-lora.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no unet/config.json"):
        setup_with(monkeypatch, tmp_path, tmp_path / "empty")
    with pytest.raises(ValueError, match="no such file or folder"):
        setup_with(monkeypatch, tmp_path, tmp_path / "nowhere")
