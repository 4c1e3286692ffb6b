"""A fine-tuned SD 1.5 base as ONE original-layout .safetensors checkpoint (what most fine-tunes ship as).

The tiny base is written here in the LDM/CompVis key layout with every weight perturbed, so a load that
silently fell back to the stock base, dropped a component or mis-mapped a key cannot pass: the loaded
UNet, VAE and text encoder must equal the perturbed weights exactly. Loading must not touch the network
(diffusers' from_single_file fetches configs from the Hub unless given the stock folder).
"""

import json
import socket

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from safetensors.torch import load_file, save_file

import weights
from models.pipeline import BaseWeightsError, load_pipeline
from tests.conftest import setup_with
from tests.ldm_checkpoint import CLIP, UNET, to_ldm

FAST = dict(ddim_steps=2, image_resolution="256", seed=21)
COMPONENTS = ("unet", "vae", "text_encoder")
NAME = "my-finetune-sd15.safetensors"


@pytest.fixture(scope="module")
def stock():
    found = weights.locate("canny")
    assert found.tiny
    return found


def diffusers_state(folder):
    """A component's tensors from its (tiny, fp16) files, in fp32 as the CPU pipeline holds them."""
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    return {key: value.float() for key, value in load_file(files[0]).items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, stock):
    """(path of the single-file checkpoint, its LDM state dict, the diffusers-named weights it must load as)."""
    g = torch.Generator().manual_seed(1234)
    expected = {}
    for name in COMPONENTS:
        state = diffusers_state(stock.base / name)
        # Stored in fp16 like a pruned fine-tune; fp16 -> fp32 is exact, so the loaded weights equal these.
        expected[name] = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).half().float() for k, v in state.items()}
    config = {name: json.loads((stock.base / name / "config.json").read_text()) for name in ("unet", "vae")}
    ldm = to_ldm(expected["unet"], config["unet"], expected["vae"], config["vae"], expected["text_encoder"])
    ldm = {k: v.half() for k, v in ldm.items()}
    # What real SD 1.5 checkpoints carry besides the weights; a loader must ignore it.
    ldm |= {CLIP + "embeddings.position_ids": torch.arange(77)[None], "alphas_cumprod": torch.linspace(1, 0, 1000)}
    path = tmp_path_factory.mktemp("single-file") / NAME
    save_file(ldm, path)
    return path, ldm, expected


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: a fetch from the Hub (or anywhere) would show up here."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test: network access to {address!r} refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def assert_state_equal(module, expected: dict):
    got = module.state_dict()
    assert set(got) == set(expected)
    unequal = [k for k in expected if got[k].shape != expected[k].shape or not torch.equal(got[k], expected[k])]
    assert not unequal, f"{len(unequal)} tensors differ from the checkpoint's, e.g. {unequal[:3]}"


def test_the_checkpoint_is_in_the_original_layout_and_perturbed(checkpoint, stock):
    """Guards the fixture itself: what the other tests feed in is an LDM file, not the stock weights."""
    path, ldm, expected = checkpoint
    assert UNET + "input_blocks.0.0.weight" in ldm and "first_stage_model.decoder.mid.attn_1.q.weight" in ldm
    assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # ldm's 1x1 conv attention
    assert CLIP + "final_layer_norm.weight" in ldm
    assert not any(k.startswith(("unet.", "down_blocks.", "vae.", "text_model.")) for k in ldm)
    for name in COMPONENTS:
        stock_state = diffusers_state(stock.base / name)
        assert set(stock_state) == set(expected[name])
        assert all(not torch.equal(stock_state[k], expected[name][k]) for k in stock_state if stock_state[k].numel() > 1)


def test_a_single_file_base_loads_offline_with_exactly_its_weights(checkpoint, stock, no_network):
    path, _, expected = checkpoint
    pipe = load_pipeline(stock.base, stock.controlnet, device="cpu", base_override=path)
    assert no_network == []
    for name in COMPONENTS:
        assert_state_equal(getattr(pipe, name), expected[name])
        assert getattr(pipe, name).dtype == torch.float32
    # What a checkpoint does not hold comes from the stock folder: the tokenizer, DDIM with SD 1.5's schedule.
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.steps_offset == 1
    assert len(pipe.tokenizer) == json.loads((stock.base / "text_encoder" / "config.json").read_text())["vocab_size"]
    assert_state_equal(pipe.controlnet, diffusers_state(stock.controlnet))


def test_a_single_file_without_a_vae_gets_sd15s_own(checkpoint, stock, tmp_path, no_network):
    path, ldm, expected = checkpoint
    no_vae = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}, no_vae)
    pipe = load_pipeline(stock.base, stock.controlnet, device="cpu", base_override=no_vae)
    assert_state_equal(pipe.vae, diffusers_state(stock.base / "vae"))
    assert_state_equal(pipe.unet, expected["unet"])
    assert_state_equal(pipe.text_encoder, expected["text_encoder"])


def sample(predictor, image) -> np.ndarray:
    files = predictor.generate(image, "a house", **FAST)
    return np.asarray(Image.open(files[-1])).astype(np.int16)


def test_cog_weights_single_file_changes_the_image_deterministically_and_keeps_the_controlnet(
    monkeypatch, tmp_path, checkpoint, stock, image_file, capsys
):
    path, _, expected = checkpoint
    image = image_file()
    plain = setup_with(monkeypatch, tmp_path, None)
    stock_image = sample(plain, image)

    tuned = setup_with(monkeypatch, tmp_path, path)
    log = capsys.readouterr().out
    assert f"canny: base from COG_WEIGHTS ({NAME})" in log and str(tmp_path) not in log
    assert_state_equal(tuned.runner.pipe.unet, expected["unet"])
    first, second = sample(tuned, image), sample(tuned, image)
    np.testing.assert_array_equal(first, second)
    assert float(np.abs(first - stock_image).mean()) > 0.5
    # The ControlNet is still canny's: same weights as the stock predictor's, not converted or replaced.
    assert_state_equal(tuned.runner.pipe.controlnet, plain.runner.pipe.controlnet.state_dict())
    assert_state_equal(tuned.runner.pipe.controlnet, ControlNetModel.from_pretrained(stock.controlnet).state_dict())
    # And the stock base is untouched by having served a fine-tune.
    np.testing.assert_array_equal(sample(setup_with(monkeypatch, tmp_path, None), image), stock_image)


def _sdxl_like(ldm):
    """SDXL's layout in miniature: CLIP-L and OpenCLIP-G under conditioner.embedders, a label_emb (the
    size/crop conditioning) and cross-attention on the two encoders' concatenated width."""
    out = {}
    for key, value in ldm.items():
        if key.startswith("cond_stage_model.transformer."):
            key = key.replace("cond_stage_model.", "conditioner.embedders.0.")
        elif key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            value = torch.cat([value, value], dim=1)
        out[key] = value
    width = ldm[UNET + "time_embed.0.weight"].shape[0]
    out |= {
        UNET + "label_emb.0.0.weight": torch.randn(width, 256).half(),
        "conditioner.embedders.1.model.positional_embedding": torch.randn(77, 32).half(),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.randn(32).half(),
    }
    return out


BAD = {  # case -> (the file's tensors from the good checkpoint's, what the message names besides)
    "random keys": (lambda ldm: {"foo.weight": torch.randn(3, 3), "bar": torch.randn(4)}, ""),
    "no tensors": (lambda ldm: {}, ""),
    "SDXL-like": (_sdxl_like, ""),
    # diffusers half-maps an OpenCLIP encoder onto SD 1.5's CLIP and leaves the rest on the meta device.
    "SD 2-like (OpenCLIP text encoder)": (lambda ldm: {
        **{k: v for k, v in ldm.items() if not k.startswith("cond_stage_model.")},
        "cond_stage_model.model.token_embedding.weight": torch.randn(944, 32).half(),
        "cond_stage_model.model.positional_embedding": torch.randn(77, 32).half(),
    }, "no text_encoder weights"),
    "one text-encoder tensor missing": (
        lambda ldm: {k: v for k, v in ldm.items() if k != CLIP + "final_layer_norm.weight"}, "no text_encoder weights"
    ),
    "UNet only": (lambda ldm: {k: v for k, v in ldm.items() if k.startswith(UNET)}, ""),
    "one UNet tensor missing": (lambda ldm: {k: v for k, v in ldm.items() if k != UNET + "out.2.weight"}, ""),
    "a UNet tensor of another shape": (
        lambda ldm: {**ldm, UNET + "out.2.weight": torch.randn(4, 32, 5, 5).half()}, ""
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_a_single_file_that_is_not_an_sd15_checkpoint_is_a_base_weights_error(case, checkpoint, stock, tmp_path, no_network):
    make, names = BAD[case]
    path = tmp_path / "bad.safetensors"
    save_file(make(checkpoint[1]), path)
    with pytest.raises(BaseWeightsError, match=r"could not be read as an SD 1\.5 checkpoint .*not SDXL / SD 2") as error:
        load_pipeline(stock.base, stock.controlnet, device="cpu", base_override=path)
    assert names in str(error.value)
    assert str(tmp_path) not in str(error.value)
    assert no_network == []


def test_a_truncated_single_file_fails_setup_clearly(monkeypatch, tmp_path, checkpoint):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(checkpoint[0].read_bytes()[:4096])
    with pytest.raises(BaseWeightsError, match="not a .safetensors file") as error:
        setup_with(monkeypatch, tmp_path, path)
    assert str(tmp_path) not in str(error.value)
