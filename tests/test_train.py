"""Training a ControlNet on paired images (models/train.py, models/train_data.py), on the tiny base, CPU."""

import base64
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw

import weights
from models.train import (
    PairDataset,
    TrainConfig,
    denoising_loss,
    initial_controlnet,
    load_frozen,
    train_controlnet,
    validation_pipeline,
    write_tar,
)
from models.train_data import TrainingDataError, read_pairs
from scripts.cog_server import CogServer
from tests.conftest import Receiver, data_uri, wait_idle


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def toy_files(n: int = 4, size: tuple[int, int] = (64, 64)) -> dict[str, bytes]:
    """A toy condition: the control map is a circle's outline, the target the same circle filled in yellow
    on blue. Captions in prompts.jsonl, the Hugging Face image-folder convention."""
    files, lines = {}, []
    width, height = size
    for i in range(n):
        box = [width // 8 + 3 * i, height // 6, width // 2 + 3 * i, height - height // 6]
        control = Image.new("RGB", size, "black")
        ImageDraw.Draw(control).ellipse(box, outline="white", width=3)
        target = Image.new("RGB", size, (30, 60, 200))
        ImageDraw.Draw(target).ellipse(box, fill=(250, 200, 0))
        files[f"images/pair{i}.png"] = png(target)
        files[f"conditioning_images/pair{i}.png"] = png(control)
        lines.append(json.dumps({"file_name": f"pair{i}.png", "text": "a yellow circle on blue"}))
    files["prompts.jsonl"] = ("\n".join(lines) + "\n").encode()
    return files


def write_archive(path: Path, files: dict[str, bytes]) -> Path:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def frozen():
    return load_frozen(weights.locate("custom", prefer="tiny").base, "cpu")


def sample(pipe, seed: int = 5, control=None) -> np.ndarray:
    kwargs = {} if control is None else {"image": Image.fromarray(control)}
    return pipe("a yellow circle", height=64, width=64, num_inference_steps=3, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images[0]


# -- (a) the zero-convolution start ----------------------------------------------------------------

def test_before_any_step_the_controlnet_leaves_the_base_model_unchanged(frozen):
    base = StableDiffusionPipeline(
        vae=frozen.vae, text_encoder=frozen.text_encoder, tokenizer=frozen.tokenizer, unet=frozen.unet,
        scheduler=DDIMScheduler.from_pretrained(frozen.scheduler_dir), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    base.set_progress_bar_config(disable=True)
    controlled = validation_pipeline(frozen, initial_controlnet(frozen.unet))
    control = np.zeros((64, 64, 3), np.uint8)
    control[16:48, 16:48] = 255
    without = sample(base)
    assert np.abs(without - sample(base, seed=6)).mean() > 1e-3  # the comparison can see a change
    np.testing.assert_array_equal(sample(controlled, control=control), without)
    # ...and so does the ControlNet the custom image serves when it has no trained weights.
    served = ControlNetModel.from_pretrained(weights.locate("custom", prefer="tiny").controlnet)
    np.testing.assert_array_equal(sample(validation_pipeline(frozen, served), control=control), without)


# -- (b) training moves the loss and the output ----------------------------------------------------

def fixed_loss(controlnet, frozen, pairs) -> float:
    """The training loss on the toy set with fixed noise and timesteps, so two models compare fairly."""
    batch = torch.utils.data.default_collate([PairDataset(pairs, 64, frozen.tokenizer)[i] for i in range(len(pairs))])
    with torch.no_grad():
        return float(np.mean([denoising_loss(controlnet, frozen, batch, torch.Generator().manual_seed(s)).item()
                              for s in range(4)]))


def test_a_few_dozen_steps_lower_the_loss_and_change_the_output(frozen, tmp_path):
    pairs = read_pairs(write_archive(tmp_path / "pairs.zip", toy_files()), tmp_path / "unpacked", 64)
    lines = []
    config = TrainConfig(max_train_steps=16, learning_rate=3e-3, train_batch_size=2, resolution=64,
                         mixed_precision="fp16", seed=3, validation_every=8, validation_steps=2, progress_every_s=0,
                         validation_prompts=("a yellow circle", "a blue square"))
    result = train_controlnet(weights.locate("custom", prefer="tiny").base, pairs, tmp_path / "out", config,
                              log=lines.append)
    log = "\n".join(lines)

    assert len(result.losses) == 16 and all(np.isfinite(result.losses))
    assert "training in fp32 instead" in log  # fp16 asked on a CPU
    assert "step 1/16  loss " in log and "step 16/16  loss " in log
    assert all(word in log for word in ("lr 3.00e-03", "steps/s", "ETA"))
    assert [p.name for p in result.validation_images] == [
        "validation-step000008-0.png", "validation-step000008-1.png", "validation-step000016-0.png",
        "validation-step000016-1.png"]
    assert all(Image.open(p).size == (128, 64) for p in result.validation_images)

    trained = ControlNetModel.from_pretrained(result.controlnet_dir)
    untrained = initial_controlnet(frozen.unet)
    before, after = fixed_loss(untrained, frozen, pairs), fixed_loss(trained, frozen, pairs)
    assert after < before * 0.95, (before, after)

    control = np.asarray(Image.open(pairs[0].conditioning).convert("RGB"))
    moved = sample(validation_pipeline(frozen, trained), control=control)
    still = sample(validation_pipeline(frozen, untrained), control=control)
    assert np.abs(moved - still).mean() > 1e-3

    # One file out: unpacked, it is a folder ControlNetModel.from_pretrained loads.
    tar = write_tar(result.controlnet_dir, tmp_path / "controlnet.tar")
    with tarfile.open(tar) as tf:
        assert sorted(tf.getnames()) == ["config.json", "diffusion_pytorch_model.safetensors"]
        tf.extractall(tmp_path / "unpacked-weights", filter="data")
    reloaded = ControlNetModel.from_pretrained(tmp_path / "unpacked-weights")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), trained.state_dict().values()))


# -- (d) the data is checked before any model loads ------------------------------------------------

@pytest.mark.parametrize("archive", ["pairs.zip", "pairs.tar", "pairs.tar.gz"])
def test_zip_and_tar_archives_with_or_without_a_top_folder_are_read(tmp_path, archive):
    nested = {f"my-set/{name}": data for name, data in toy_files(3).items()}
    pairs = read_pairs(write_archive(tmp_path / archive, nested), tmp_path / "u", 64, log=lambda _: None)
    assert [p.name for p in pairs] == ["pair0.png", "pair1.png", "pair2.png"]
    assert {p.caption for p in pairs} == {"a yellow circle on blue"}


def test_captions_may_come_from_prompts_csv(tmp_path):
    files = toy_files(2)
    del files["prompts.jsonl"]
    files["prompts.csv"] = b'file_name,text\npair0.png,"a circle, yellow"\nimages/pair1.png,another one\n'
    pairs = read_pairs(write_archive(tmp_path / "p.zip", files), tmp_path / "u", 64, log=lambda _: None)
    assert [p.caption for p in pairs] == ["a circle, yellow", "another one"]


def broken(case: str) -> dict[str, bytes]:
    files = toy_files(3)
    if case == "no pairs":
        files = {"images/.keep": b"", "conditioning_images/.keep": b"", "prompts.jsonl": b""}
    elif case == "no folders":
        files = {"pair0.png": files["images/pair0.png"], "prompts.jsonl": files["prompts.jsonl"]}
    elif case == "unmatched names":
        files["conditioning_images/other.png"] = files.pop("conditioning_images/pair2.png")
    elif case == "unreadable image":
        files["images/pair1.png"] = b"this is not a png"
    elif case == "truncated image":
        files["conditioning_images/pair1.png"] = files["conditioning_images/pair1.png"][:120]
    elif case == "missing captions":
        files["prompts.jsonl"] = json.dumps({"file_name": "pair0.png", "text": "x"}).encode()
    elif case == "empty caption":
        files["prompts.jsonl"] = b"\n".join(
            json.dumps({"file_name": f"pair{i}.png", "text": "" if i == 1 else "x"}).encode() for i in range(3))
    elif case == "no prompts file":
        del files["prompts.jsonl"]
    elif case == "bad jsonl":
        files["prompts.jsonl"] = b'{"file_name": "pair0.png", "text": "x"}\n{oops\n'
    return files


@pytest.mark.parametrize("case, message", [
    ("no pairs", "no pairs"),
    ("no folders", "needs a folder images/"),
    ("unmatched names", "pair2.png"),
    ("unreadable image", "cannot be decoded: pair1.png"),
    ("truncated image", "cannot be decoded: pair1.png"),
    ("missing captions", "2 pair(s) have no caption (or an empty one) in the prompts file: pair1.png, pair2.png"),
    ("empty caption", "1 pair(s) have no caption (or an empty one) in the prompts file: pair1.png"),
    ("no prompts file", "no captions: put prompts.jsonl"),
    ("bad jsonl", "prompts.jsonl line 2 is not JSON"),
])
def test_bad_training_data_is_refused_with_what_to_fix(tmp_path, case, message):
    with pytest.raises(TrainingDataError) as err:
        read_pairs(write_archive(tmp_path / "bad.zip", broken(case)), tmp_path / "u", 64, log=lambda _: None)
    assert message in str(err.value)


def test_unmatched_names_are_listed_from_both_sides(tmp_path):
    with pytest.raises(TrainingDataError) as err:
        read_pairs(write_archive(tmp_path / "bad.zip", broken("unmatched names")), tmp_path / "u", 64)
    assert "in images/ have no control map of the same name in conditioning_images/: pair2.png" in str(err.value)
    assert "in conditioning_images/ have no target of the same name in images/: other.png" in str(err.value)


def test_not_an_archive_and_unsafe_paths_are_refused(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"plain text")
    with pytest.raises(TrainingDataError, match="neither a zip nor a tar"):
        read_pairs(tmp_path / "x.zip", tmp_path / "u", 64)
    for name, files in [("evil.tar", toy_files(1) | {"../escape.txt": b"x"}),
                        ("evil.zip", toy_files(1) | {"../escape.txt": b"x"}),
                        ("abs.zip", toy_files(1) | {"/tmp/abs.txt": b"x"})]:
        with pytest.raises(TrainingDataError, match=r"holds a path outside its folder: '(\.\./escape|/tmp/abs)\.txt'") as err:
            read_pairs(write_archive(tmp_path / name, files), tmp_path / "u2", 64)
        assert str(tmp_path) not in str(err.value)  # tarfile's own message names the destination folder
    assert not (tmp_path / "escape.txt").exists()
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tf:
        info = tarfile.TarInfo("images/pair0.png")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tf.addfile(info)
    with pytest.raises(TrainingDataError, match="holds a link: 'images/pair0.png'"):
        read_pairs(link, tmp_path / "u3", 64)
    clash = toy_files(1)
    clash = {"images": b"a file where a folder goes", **clash}
    with pytest.raises(TrainingDataError, match="holds two entries for one path at 'images/pair0.png'"):
        read_pairs(write_archive(tmp_path / "clash.tar", clash), tmp_path / "u4", 64)


class Zeros:
    """A file of `size` zero bytes, read in pieces: the body of an archive bomb."""

    def __init__(self, size):
        self.left = size

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


def bomb(path: Path, size: int) -> Path:
    """A valid-looking pairs archive plus one member of `size` zeros (which compresses ~1000:1)."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in toy_files(1).items():
                zf.writestr(name, data)
            with zf.open("images/zeros.png", "w", force_zip64=True) as out:
                shutil.copyfileobj(Zeros(size), out)
    else:
        with tarfile.open(path, "w:gz") as tf:
            for name, data in toy_files(1).items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("images/zeros.png")
            info.size = size
            tf.addfile(info, Zeros(size))
    return path


def lying_zip(path: Path, size: int) -> Path:
    """A zip whose headers declare its big member 10 bytes long."""
    bomb(path, size)
    raw = bytearray(path.read_bytes())
    for signature, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := raw.find(signature, start)) >= 0:
            name_length = int.from_bytes(raw[start + field + 4 : start + field + 6], "little")
            name_at = start + (30 if signature == b"PK\x03\x04" else 46)
            if raw[name_at : name_at + name_length] == b"images/zeros.png":
                raw[start + field : start + field + 4] = (10).to_bytes(4, "little")
            start += 4
    path.write_bytes(bytes(raw))
    return path


def unpacked_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("make", [
    lambda tmp: bomb(tmp / "bomb.zip", 8 * 2**20),
    lambda tmp: bomb(tmp / "bomb.tar.gz", 8 * 2**20),
    lambda tmp: lying_zip(tmp / "lying.zip", 8 * 2**20),
], ids=["zip", "tar.gz", "zip with lying sizes"])
def test_an_archive_bomb_stops_at_the_bound_before_filling_the_disk(tmp_path, monkeypatch, make):
    monkeypatch.setenv("CONTROLNET_TRAIN_MAX_UNPACKED_MB", "1")
    archive = make(tmp_path)
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(TrainingDataError, match="the pairs archive (unpacks to more than 1 MiB|is damaged)") as err:
        read_pairs(archive, tmp_path / "u", 64)
    assert str(tmp_path) not in str(err.value)
    assert unpacked_bytes(tmp_path / "u") <= 2**20  # stopped at the bound, not after


def test_an_archive_unpacks_to_at_most_a_multiple_of_its_own_size(tmp_path, monkeypatch):
    from models import train_data

    monkeypatch.setattr(train_data, "RATIO_FLOOR", 2**20)
    archive = bomb(tmp_path / "bomb.tar.gz", 8 * 2**20)  # ~8 KB unpacking to 8 MiB: ~1000 times its size
    with pytest.raises(TrainingDataError, match="unpacks to more than 1 MiB"):
        read_pairs(archive, tmp_path / "u", 64)
    assert unpacked_bytes(tmp_path / "u") <= 2**20
    assert len(read_pairs(write_archive(tmp_path / "ok.tar.gz", toy_files(3)), tmp_path / "u2", 64)) == 3


@pytest.mark.parametrize("archive", ["many.zip", "many.tar"])
def test_an_archive_of_too_many_files_is_refused(tmp_path, monkeypatch, archive):
    monkeypatch.setenv("CONTROLNET_TRAIN_MAX_FILES", "20")
    with pytest.raises(TrainingDataError, match="holds more than 20 files and folders"):
        read_pairs(write_archive(tmp_path / archive, toy_files(12)), tmp_path / "u", 64)
    assert len([p for p in (tmp_path / "u").rglob("*") if p.is_file()]) <= 20


def test_damaged_archives_and_undecodable_captions_say_what_to_fix(tmp_path):
    good = write_archive(tmp_path / "good.zip", toy_files(2)).read_bytes()
    bad_crc = bytearray(good)
    central = bad_crc.find(b"PK\x01\x02")
    bad_crc[central + 16] ^= 0xFF  # the first member's CRC-32 in the central directory
    (tmp_path / "crc.zip").write_bytes(bytes(bad_crc))
    tar_gz = write_archive(tmp_path / "good.tar.gz", toy_files(2)).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(tar_gz[: len(tar_gz) // 2])
    latin1 = toy_files(2)
    latin1["prompts.jsonl"] = '{"file_name": "pair0.png", "text": "café"}\n'.encode("latin-1")
    csv_latin1 = toy_files(2)
    del csv_latin1["prompts.jsonl"]
    csv_latin1["prompts.csv"] = "file_name,text\npair0.png,x\npair1.png,café\n".encode("latin-1")
    cases = [
        (tmp_path / "crc.zip", "the pairs archive is damaged at 'images/pair0.png' (its checksum does not match)"),
        (tmp_path / "cut.tar.gz", "the pairs archive is damaged"),
        (write_archive(tmp_path / "latin1.zip", latin1), "prompts.jsonl is not UTF-8 text (line 1 holds the byte 0xe9)"),
        (write_archive(tmp_path / "csv.zip", csv_latin1), "prompts.csv is not UTF-8 text (line 3 holds the byte 0xe9)"),
    ]
    for number, (archive, message) in enumerate(cases):
        with pytest.raises(TrainingDataError) as err:
            read_pairs(archive, tmp_path / f"u{number}", 64)
        assert message in str(err.value) and str(tmp_path) not in str(err.value)


def test_mixed_sizes_are_resized_and_said_in_the_logs(tmp_path, frozen):
    files = toy_files(2, size=(96, 64))
    files.update({k.replace("pair", "big"): v for k, v in toy_files(1, size=(128, 160)).items() if k != "prompts.jsonl"})
    files["prompts.jsonl"] += json.dumps({"file_name": "big0.png", "text": "big"}).encode()
    files["conditioning_images/pair1.png"] = png(Image.new("RGB", (48, 32)))
    lines = []
    pairs = read_pairs(write_archive(tmp_path / "m.zip", files), tmp_path / "u", 64, log=lines.append)
    log = "\n".join(lines)
    assert len(pairs) == 3
    assert "96x64 (2), 128x160 (1): every pair is resized (short side) and centre-cropped to 64x64" in log
    assert "different sizes" in log and "pair1.png" in log
    dataset = PairDataset(pairs, 64, frozen.tokenizer)
    assert {tuple(dataset[i]["pixel_values"].shape) for i in range(3)} == {(3, 64, 64)}
    assert {tuple(dataset[i]["conditioning_pixel_values"].shape) for i in range(3)} == {(3, 64, 64)}


# -- (c) train through Cog, serve the result through Cog ---------------------------------------------

def from_uri(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def test_the_weights_train_returns_are_served_by_the_custom_image(tmp_path):
    """`cog train` runs the image with --x-mode train and POSTs /trainings; the tar it returns is then
    served through COG_WEIGHTS (a local path here; a URL in production)."""
    archive = write_archive(tmp_path / "pairs.zip", toy_files()).read_bytes()
    inputs = {"pairs": data_uri(archive, "application/zip"), "max_train_steps": 12, "resolution": 64,
              "train_batch_size": 2, "learning_rate": 2e-3, "seed": 3, "validation_every": 6,
              "mixed_precision": "no"}
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    env = {"TMPDIR": str(server_tmp), "CONTROLNET_TRAIN_ARCHIVE_MAX_MB": "1"}
    with CogServer("custom", mode="train", log_path=tmp_path / "train.log", env=env) as trainer:
        schema = requests.get(f"{trainer.url}/openapi.json", timeout=10).json()
        fields = schema["components"]["schemas"]["TrainingInput"]["properties"]
        assert fields["learning_rate"]["default"] == 1e-5 and fields["resolution"]["default"] == 512
        bad = trainer.train({**inputs, "pairs": data_uri(write_archive(tmp_path / "bad.zip", broken("unmatched names"))
                                                         .read_bytes(), "application/zip")}).json()
        assert bad["status"] == "failed" and "have no control map of the same name" in bad["error"]
        assert "Using seed" not in bad["logs"]  # refused before any model was loaded
        assert_bad_archives_fail_in_the_clients_terms(trainer, inputs, tmp_path)
        assert_a_training_can_be_cancelled(trainer, inputs)
        body = trainer.train(inputs).json()
    assert body["status"] == "succeeded", body.get("error")
    assert "step 12/12  loss " in body["logs"] and "ETA" in body["logs"]
    assert len(body["output"]["validation_images"]) == 2  # at steps 6 and 12
    # The returned files live until the next training or the server's stop, then nothing is left.
    assert [p.name for p in server_tmp.iterdir() if p.name.startswith("controlnet-train-")] == []
    weights_tar = tmp_path / "controlnet.tar"
    weights_tar.write_bytes(from_uri(body["output"]["weights"]))

    control = png(Image.open(io.BytesIO(toy_files(1)["conditioning_images/pair0.png"])))
    request = {"image": data_uri(control, "image/png"), "prompt": "a yellow circle", "image_resolution": "256",
               "ddim_steps": 2, "seed": 7}
    with CogServer("custom", weights=str(weights_tar), log_path=tmp_path / "serve.log") as served:
        assert "controlnet from COG_WEIGHTS (controlnet.tar)" in served.log()
        with_control = served.predict(request).json()
        base_only = served.predict({**request, "controlnet_conditioning_scale": 0.0}).json()
    assert with_control["status"] == base_only["status"] == "succeeded", with_control.get("error")
    assert "UNTRAINED" not in with_control["logs"]
    moved, base = (np.asarray(Image.open(io.BytesIO(from_uri(b["output"][1])))).astype(int)
                   for b in (with_control, base_only))
    assert np.abs(moved - base).mean() > 0.5


def assert_bad_archives_fail_in_the_clients_terms(trainer, inputs, tmp_path):
    """What reaches a client of a train-mode server: one line saying what to fix, no traceback, no path."""
    receiver = Receiver()
    good = write_archive(tmp_path / "crc.zip", toy_files(2)).read_bytes()
    bad_crc = bytearray(good)
    bad_crc[bad_crc.find(b"PK\x01\x02") + 16] ^= 0xFF
    latin1 = toy_files(2)
    latin1["prompts.jsonl"] = '{"file_name": "pair0.png", "text": "café"}\n'.encode("latin-1")
    cases = [
        (receiver.url("/big"), "pairs archive URL is 5 MiB; send at most 1 MiB"),  # its own bound, its own name
        (data_uri(bytes(bad_crc), "application/zip"), "the pairs archive is damaged at 'images/pair0.png'"),
        (data_uri(write_archive(tmp_path / "latin1.zip", latin1).read_bytes(), "application/zip"),
         "prompts.jsonl is not UTF-8 text"),
        (data_uri(write_archive(tmp_path / "evil.tar", toy_files(1) | {"../x.txt": b"x"}).read_bytes(), "application/x-tar"),
         "the pairs archive holds a path outside its folder: '../x.txt'"),
    ]
    for pairs, message in cases:
        body = trainer.train({**inputs, "pairs": pairs}).json()
        assert body["status"] == "failed" and message in body["error"], body.get("error")
        assert "Traceback" not in body["logs"] and "/tmp" not in body["logs"] + body["error"], body["logs"]


def assert_a_training_can_be_cancelled(trainer, inputs):
    """Cog 0.16.12's own /trainings/{id}/cancel answers 500 and cancels nothing (cog_base/cog016/serving.py)."""
    receiver = Receiver()
    long = {**inputs, "max_train_steps": 100000, "validation_every": 0}
    body = {"input": long, "webhook": receiver.url("/hook/t1")}
    started = requests.put(f"{trainer.url}/trainings/t1", json=body, headers={"Prefer": "respond-async"}, timeout=30)
    assert started.status_code == 202, started.text
    receiver.wait_logs("/hook/t1", "step 1/")  # training progress before cancelling
    assert requests.post(f"{trainer.url}/trainings/t1/cancel", timeout=10).status_code == 200
    final = receiver.wait_final("/hook/t1", timeout=120)[-1]
    assert final["status"] == "canceled" and "step 100000/" not in final["logs"]
    assert requests.post(f"{trainer.url}/trainings/unknown/cancel", timeout=10).status_code == 404
    wait_idle(trainer, timeout=60)


def test_make_weights_derives_the_untrained_controlnet_from_the_real_base(tmp_path, monkeypatch):
    tiny_base = weights.locate("custom", prefer="tiny").base
    monkeypatch.setenv("CONTROLNET_WEIGHTS_DIR", str(tmp_path))
    base = weights.MANIFEST["conditions"]["custom"]["base"]
    shutil.copytree(tiny_base, tmp_path / base)
    weights.write_marker(tmp_path / base, revision=weights.revision(base))  # stands in for the download
    from weights.download import main

    main(["custom"])
    found = weights.locate("custom", prefer="real")
    assert found.controlnet.name == "controlnet-untrained"
    assert ControlNetModel.from_pretrained(found.controlnet).controlnet_mid_block.weight.abs().max() == 0


def test_init_from_takes_a_weights_tar_by_uri_and_refuses_anything_else(tmp_path, monkeypatch):
    from predictors.custom.train import _fetch_controlnet

    cache = tmp_path / "cache"
    monkeypatch.setenv("CONTROLNET_ASSET_CACHE", str(cache))
    tiny = weights.locate("custom", prefer="tiny")
    tar = write_tar(tiny.controlnet, tmp_path / "cn.tar")
    assert (_fetch_controlnet(data_uri(tar.read_bytes(), "application/x-tar")) / "config.json").is_file()
    folder_zip = write_archive(tmp_path / "cn.zip", {p.name: p.read_bytes() for p in tiny.controlnet.iterdir()})
    assert (_fetch_controlnet(data_uri(folder_zip.read_bytes(), "application/zip")) / "config.json").is_file()
    with pytest.raises(ValueError, match="init_from must be"):
        _fetch_controlnet(data_uri(write_archive(tmp_path / "p.zip", toy_files(1)).read_bytes(), "application/zip"))


def test_init_from_and_asset_urls_never_read_server_paths(tmp_path, monkeypatch, capsys):
    """A client's input names only what a client can reach: a path on the server gets the same answer
    whether or not it exists (no file oracle), and nothing of it is read or unpacked."""
    from predictors.custom.train import _fetch_controlnet

    cache = tmp_path / "cache"
    monkeypatch.setenv("CONTROLNET_ASSET_CACHE", str(cache))
    tiny = weights.locate("custom", prefer="tiny")
    tar = write_tar(tiny.controlnet, tmp_path / "cn.tar")
    paths = [str(tar), str(tiny.controlnet), str(tmp_path / "missing.tar"), "/etc/passwd", "file:///etc/passwd", "cn.tar"]
    answers = set()
    for path in paths:
        with pytest.raises(ValueError) as error:
            _fetch_controlnet(path)
        answers.add(str(error.value))
    assert len(answers) == 1 and "paths on the server are not accepted" in answers.pop()
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name.endswith(".d")]
    from models.assets import AssetCache, AssetError

    assets = AssetCache(cache)
    for what in ("lora_url", "embedding_url"):
        answers = set()
        for path in paths:
            with pytest.raises(AssetError) as error:
                assets.fetch(path, what)
            answers.add(str(error.value).replace(repr(path[:40]), "<the input>"))
        assert answers == {f"{what} must be an http(s) URL or a data: URI, not <the input>"}


def test_an_init_from_archive_is_unpacked_within_bounds(tmp_path, monkeypatch):
    from predictors.custom.train import _fetch_controlnet

    monkeypatch.setenv("CONTROLNET_ASSET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CONTROLNET_ASSET_CACHE_MB", "1")
    with pytest.raises(ValueError, match="the init_from archive unpacks to more than 1 MiB") as error:
        _fetch_controlnet(data_uri(bomb(tmp_path / "bomb.tar.gz", 8 * 2**20).read_bytes(), "application/gzip"))
    assert str(tmp_path) not in str(error.value)
    assert [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".d")] == []  # nothing left unpacked


@pytest.mark.parametrize("has_filter", [True, False], ids=["python-with-tar-filter", "python-3.11.2-without"])
def test_unsafe_tar_entries_are_refused_alike_with_or_without_tarfiles_filter(tmp_path, monkeypatch, has_filter):
    """Debian bookworm's Python 3.11.2 (the plain-Docker image's) has no tarfile.data_filter; where it
    exists it strips a leading '/', which would accept there what is refused without it."""
    from models import archives

    if not has_filter:
        monkeypatch.setattr(archives, "_DATA_FILTER", None)

    def tar(name, kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.tar"
        with tarfile.open(path, "w") as tf:
            tf.addfile(info, io.BytesIO(b"x") if kind == tarfile.REGTYPE else None)
        return path

    bounds = archives.Bounds(max_bytes=2**20, max_entries=10)
    for archive, says in [(tar("../escape.txt"), "a path outside its folder"), (tar("/etc/x"), "a path outside its folder: '/etc/x'"),
                          (tar("a", tarfile.SYMTYPE, "/etc/passwd"), "a link"),
                          (tar("f", tarfile.FIFOTYPE), "a device or other special file")]:
        with pytest.raises(archives.ArchiveError, match=says):
            archives.unpack(archive, tmp_path / "out", bounds)
    assert not (tmp_path.parent / "escape.txt").exists()
    out = archives.unpack(tar("images/a.txt"), tmp_path / "ok", bounds)
    assert (out / "images" / "a.txt").read_bytes() == b"x"
