import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

import weights
from models.pipeline import load_pipeline

REPO = Path(__file__).resolve().parent.parent


def test_manifest_pins_every_component_and_conditions_use_known_ones():
    components = weights.MANIFEST["components"]
    for name, spec in components.items():
        if "from_unet" in spec:  # derived locally from a pinned base
            assert "files" in components[spec["from_unet"]], f"{name} derives from an unknown base"
            continue
        if spec["revision"] is None:  # no commit found: make weights skips it and says why
            assert spec.get("unpinned"), f"{name} is not pinned to a commit and says not why"
        else:
            assert re.fullmatch(r"[0-9a-f]{40}", spec["revision"]), f"{name} is not pinned to a commit"
        assert spec["files"], f"{name} downloads nothing"
        assert spec.get("license"), f"{name} names no licence"
        assert set(spec.get("sha256", {})) <= set(spec["files"]), f"{name} has a digest for a file it does not fetch"
        assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in spec.get("sha256", {}).values())
    for condition in weights.CONDITIONS:
        roles = weights.components(condition)
        assert {"base", "controlnet"} <= set(roles)
        assert set(roles.values()) <= set(components)


def test_locate_finds_tiny_weights_in_the_real_layout(tiny_weights):
    found = weights.locate("canny", prefer="tiny")
    assert found.tiny
    assert found.base == tiny_weights / "stable-diffusion-v1-5"
    assert (found.base / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (found.controlnet / "diffusion_pytorch_model.safetensors").is_file()


def test_missing_weights_name_the_commands_that_fix_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLNET_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(weights.MissingWeightsError) as err:
        weights.locate("canny", prefer="auto")
    assert "make weights COND=canny" in str(err.value)
    assert "make tiny-weights" in str(err.value)
    with pytest.raises(weights.MissingWeightsError, match="make weights COND=canny"):
        weights.locate("canny", prefer="real")


def test_a_download_of_another_revision_or_an_unfinished_one_does_not_count(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLNET_WEIGHTS_DIR", str(tmp_path))
    for name in weights.components("canny").values():
        (tmp_path / name).mkdir()
    with pytest.raises(weights.MissingWeightsError):  # no markers: interrupted downloads
        weights.locate("canny", prefer="real")
    for name in weights.components("canny").values():
        weights.write_marker(tmp_path / name, revision="0" * 40)
    with pytest.raises(weights.MissingWeightsError):
        weights.locate("canny", prefer="real")
    for name in weights.components("canny").values():
        weights.write_marker(tmp_path / name, revision=weights.MANIFEST["components"][name]["revision"])
    assert not weights.locate("canny", prefer="real").tiny


def test_unknown_condition_lists_the_known_ones():
    with pytest.raises(ValueError, match="canny"):
        weights.components("lineart_anime")


def test_every_controlnet_11_image_carries_its_1_1_model():
    expected = {
        "lineart": "lllyasviel/control_v11p_sd15_lineart", "softedge": "lllyasviel/control_v11p_sd15_softedge",
        "shuffle": "lllyasviel/control_v11e_sd15_shuffle", "tile": "lllyasviel/control_v11f1e_sd15_tile",
        "ip2p": "lllyasviel/control_v11e_sd15_ip2p", "inpaint": "lllyasviel/control_v11p_sd15_inpaint",
    }
    for condition, repo in expected.items():
        assert weights.MANIFEST["components"][weights.components(condition)["controlnet"]]["repo"] == repo
    detector_files = {
        name: weights.MANIFEST["components"][roles["detector"]]["files"]
        for name, roles in ((c, weights.components(c)) for c in expected) if "detector" in roles
    }
    # controlnet_aux's file names: LineartDetector and PidiNetDetector/HEDdetector.from_pretrained defaults
    assert detector_files == {"lineart": ["sk_model.pth", "sk_model2.pth"],
                              "softedge": ["ControlNetHED.pth", "table5_pidinet.pth"]}


@pytest.mark.parametrize("condition", ["canny", "lineart"])
def test_download_fails_fast_offline_and_names_what_it_tried(tmp_path, condition):
    env = {**os.environ, "CONTROLNET_WEIGHTS_DIR": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "weights.download", condition], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert "127.0.0.1:9" in proc.stderr
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5@451f4fe161" in proc.stderr
    assert "make tiny-weights" in proc.stderr
    assert not any(tmp_path.iterdir()) or not weights.marker(tmp_path / "stable-diffusion-v1-5")


def test_real_loader_on_the_tiny_folder_builds_the_production_pipeline():
    found = weights.locate("canny", prefer="tiny")
    pipe = load_pipeline(found.base, found.controlnet, device="cpu")
    assert isinstance(pipe.scheduler, DDIMScheduler)
    # ControlNet 1.0's ldm DDIM: leading spacing offset by one, no clipping, alpha_prod_t_prev of step 0 not 1
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.set_alpha_to_one is False
    assert pipe.safety_checker is None
    for module in (pipe.unet, pipe.controlnet, pipe.vae, pipe.text_encoder):
        assert module.dtype == torch.float32  # fp16 files upcast on CPU
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae_scale_factor == 8


def fake_snapshot(files_present):
    """Stands in for the hub: writes the files a real snapshot_download would, for the allow_patterns."""

    def snapshot_download(repo_id, revision, allow_patterns, local_dir):
        for rel in files_present:
            (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / rel).write_text(f"{repo_id}@{revision}")
        return str(local_dir)

    return snapshot_download


def test_download_marks_each_component_complete_at_its_revision(tmp_path, monkeypatch):
    import huggingface_hub

    import weights.download as download

    monkeypatch.setenv("CONTROLNET_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(download, "check_reachable", lambda url, what: None)
    spec = weights.MANIFEST["components"]["sd-controlnet-canny"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(spec["files"]))
    download.download_component("sd-controlnet-canny", tmp_path / "sd-controlnet-canny")
    assert weights.is_complete(tmp_path / "sd-controlnet-canny", "sd-controlnet-canny", tiny=False)
    assert weights.marker(tmp_path / "sd-controlnet-canny")["revision"] == spec["revision"]


def test_download_refuses_a_revision_missing_a_listed_file(tmp_path, monkeypatch):
    import huggingface_hub

    import weights.download as download

    monkeypatch.setattr(download, "check_reachable", lambda url, what: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(["config.json"]))
    with pytest.raises(SystemExit, match="diffusion_pytorch_model.safetensors"):
        download.download_component("sd-controlnet-canny", tmp_path / "c")
    assert weights.marker(tmp_path / "c") is None


def test_download_refuses_a_file_whose_sha256_differs_from_the_manifests(tmp_path, monkeypatch):
    import huggingface_hub

    import weights.download as download

    name = "annotators-lineart"
    spec = weights.MANIFEST["components"][name]
    assert set(spec["sha256"]) == set(spec["files"])
    monkeypatch.setattr(download, "check_reachable", lambda url, what: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(spec["files"]))  # other bytes
    with pytest.raises(SystemExit, match="sk_model.pth, sk_model2.pth .*do not have the manifest's sha256"):
        download.download_component(name, tmp_path / name)
    assert weights.marker(tmp_path / name) is None


def test_download_accepts_files_with_the_manifests_sha256(tmp_path, monkeypatch):
    import hashlib

    import huggingface_hub

    import weights.download as download

    name = "annotators-lineart"
    files = weights.MANIFEST["components"][name]["files"]
    fake = fake_snapshot(files)
    monkeypatch.setattr(download, "check_reachable", lambda url, what: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    contents = {rel: f"lllyasviel/Annotators@{weights.revision(name)}".encode() for rel in files}
    digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()}
    monkeypatch.setitem(weights.MANIFEST["components"][name], "sha256", digests)
    download.download_component(name, tmp_path / name)
    assert weights.is_complete(tmp_path / name, name, tiny=False)


def test_a_combined_image_carries_every_condition_it_serves_and_gives_each_its_own_folders():
    found = weights.locate("multi", prefer="tiny")
    assert set(found.folders.values()) == {
        found.base.parent / name for c in weights.COMBINED["multi"] for role, name in weights.components(c).items()
        if not weights.version_of(role)}  # each unit runs its condition's default version
    seg = found.of("seg")
    assert (seg.controlnet.name, seg.detector.name) == (weights.components("seg")["controlnet"],
                                                        weights.components("seg")["detector"])
    assert found.of("canny").detector is None and found.of("canny").base == found.base
    with pytest.raises(ValueError, match="serves no condition 'custom'"):
        found.of("custom")
    assert weights.conditions_of("canny") == ("canny",)


def _tar(path: Path, members: dict) -> Path:
    """A tar of `members` (name -> bytes, or a str: a symlink to that target)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tf.addfile(info)
            else:
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    return path


@pytest.mark.parametrize("has_filter", [True, False], ids=["python-with-tar-filter", "python-3.11.2-without"])
def test_cog_weights_archives_unpack_on_every_python_and_refuse_escapes(tmp_path, monkeypatch, has_filter):
    # Debian bookworm's Python 3.11.2 (the plain-Docker image) has no tarfile extraction filter: a
    # COG_WEIGHTS tar failed there with "unexpected keyword argument 'filter'".
    from models import archives
    from models.assets import AssetCache, AssetError, fetch_weights

    if not has_filter:
        monkeypatch.setattr(archives, "_DATA_FILTER", None)
    cache = AssetCache(tmp_path / "cache")
    good = _tar(tmp_path / "model.tar", {"model/unet/config.json": b"{}", "model/vae/config.json": b"{}"})
    folder = fetch_weights(str(good), cache)
    assert folder.name == "model" and (folder / "unet" / "config.json").read_bytes() == b"{}"
    for name, members, says in (
        ("escape.tar", {"../escape.txt": b"x"}, "outside its folder"),
        ("link.tar", {"model/unet": "/etc"}, "a link"),
    ):
        with pytest.raises(AssetError, match=says) as refused:
            fetch_weights(str(_tar(tmp_path / name, members)), cache)
        assert str(tmp_path) not in str(refused.value)
    assert not (tmp_path / "escape.txt").exists()


def test_cog_weights_archive_is_bounded(tmp_path, monkeypatch):
    from models.assets import AssetCache, AssetError, fetch_weights

    monkeypatch.setenv("CONTROLNET_WEIGHTS_MAX_UNPACKED_MB", "1")
    big = _tar(tmp_path / "big.tar", {"model/unet/diffusion_pytorch_model.safetensors": b"\0" * (2 * 2**20)})
    with pytest.raises(AssetError, match="unpacks to more than 1 MiB"):
        fetch_weights(str(big), AssetCache(tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("*.d"))  # nothing half-unpacked is kept
