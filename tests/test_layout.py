"""The repo's own invariants: one list of conditions, Cog configs that agree with the pins, and image
build contexts that carry only their own condition."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import weights
from scripts.cog_config import MIN_COG_CLI, field, has_field, pinned_sdk

ROOT = Path(__file__).resolve().parent.parent


def test_images_match_the_predictors_folders():
    folders = sorted(p.name for p in (ROOT / "predictors").iterdir() if (p / "predict.py").is_file())
    assert folders == sorted(weights.IMAGES)
    for image, served in weights.COMBINED.items():  # a combined image serves conditions that have images
        assert set(served) <= set(weights.CONDITIONS) and image not in weights.CONDITIONS


def test_readme_table_lists_every_condition_once():
    rows = re.findall(r"^\| `(\w+)` \|", (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    conditions = [row for row in rows if (ROOT / "predictors" / row).is_dir()]
    assert sorted(conditions) == sorted(weights.IMAGES)


def test_every_cog_yaml_pins_the_sdk_and_requirements_the_tests_use():
    import cog

    assert cog.__version__ == pinned_sdk()
    for condition in weights.IMAGES:
        assert field(condition, "sdk_version") == pinned_sdk()
        assert field(condition, "python_requirements") == "requirements.txt"
        assert field(condition, "gpu") == "true"
        assert field(condition, "predict") == f"predictors/{condition}/predict.py:Predictor"
        if has_field(condition, "train"):  # trainable images keep train() beside their predictor
            assert field(condition, "train") == f"predictors/{condition}/train.py:train"
    assert has_field("custom", "train")


def test_cog_stays_out_of_the_model_code():
    for path in (ROOT / "models").rglob("*.py"):
        text = path.read_text()
        assert "import cog" not in text and "from cog" not in text, path


PROJECT_CODE = ("cog_base", "models", "predictors", "weights", "scripts", "bench", "deploy")


def project_modules(*folders):
    """(path, module name, parsed tree) of each Python file under `folders` (default: all project code)."""
    for folder in folders or PROJECT_CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield path, name, ast.parse(path.read_text(), str(path))


def imported(tree) -> list[tuple[str, tuple[str, ...]]]:
    """Every import in a module, at any depth: (module, the names taken from it)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, tuple(alias.name for alias in node.names)))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((str(node.args[0].value), ()))
    return found


def test_only_the_cog016_folder_knows_cogs_python_server():
    """Deleting cog_base/cog016/ is the Cog upgrade's first step: nothing else reaches into Cog's
    server, its other modules or its private names; the rest imports only `cog`'s public top level."""
    cog016 = ROOT / "cog_base" / "cog016"
    for path, _, tree in project_modules():
        if cog016 in path.parents:
            continue
        for module, names in imported(tree):
            if module == "cog_base.cog016" or module.startswith("cog_base.cog016."):
                assert path.name == "runtime.py" or path.name == "openapi_dump.py", (path, module)
                continue
            if module == "cog" or module.startswith("cog."):
                assert module == "cog" and not any(name.startswith("_") for name in names), (path, module, names)


def test_only_the_registry_reads_the_insides_of_a_cog_input():
    """An Input's default, bounds and choices are read in one place (cog_base.inputs.read)."""
    allowed = {ROOT / "cog_base" / "inputs.py"}
    for path, _, tree in project_modules("cog_base", "predictors", "models"):
        if ROOT / "cog_base" / "cog016" in path.parents or path in allowed:
            continue
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        internals = {"json_schema_extra", "_attributes_set", "is_required"}
        if path.relative_to(ROOT).parts[0] != "models":  # a safetensors file has metadata too
            internals.add("metadata")
        assert not attributes & internals, (path, attributes & internals)


def test_dependencies_point_one_way():
    """predictors -> cog_base -> models: the model code imports none of the packages above it, and the
    benchmark's modules import each other without a circle."""
    for path, _, tree in project_modules("models"):
        for module, _ in imported(tree):
            assert module.split(".")[0] not in ("cog", "cog_base", "predictors", "weights", "scripts", "bench"), (path, module)
    graph = {name: {m for m, _ in imported(tree) if m.startswith("bench.")}
             | {f"bench.{n}" for m, names in imported(tree) if m == "bench" for n in names}
             for _, name, tree in project_modules("bench")}

    def cycle_from(name, seen=()):
        if name in seen:
            return seen[seen.index(name):] + (name,)
        return next((c for c in (cycle_from(n, seen + (name,)) for n in graph.get(name, ())) if c), None)

    for name in graph:
        assert cycle_from(name) is None, cycle_from(name)


def predictor_module(condition):
    import importlib

    return importlib.import_module(f"predictors.{condition}.predict")


def test_conditions_whose_map_is_the_upload_share_one_detector_module():
    # Staging skips the other conditions' detector modules, so the shared module is what each of these
    # images carries, rather than a copy of the same class per condition.
    import numpy as np

    from models.detectors.upload import UploadAsMap

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    identity = []
    for condition in weights.CONDITIONS:
        cls = predictor_module(condition).Predictor.detector_class()
        if weights.components(condition).get("detector") is None:  # detectors with weights are not the upload
            try:
                same = np.array_equal(cls.from_weights(None)(image), image)
            except ValueError:  # inpaint: needs its mask
                same = False
            if same:
                identity.append(condition)
                assert cls is UploadAsMap, condition
    assert sorted(identity) == ["custom", "ip2p", "tile"]


def fake_real_weights(root: Path, condition: str) -> None:
    for name in weights.components(condition).values():
        if (root / name).exists():
            continue
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
        weights.write_marker(root / name, revision=weights.revision(name))
    (root / "tiny" / "not-this").mkdir(parents=True, exist_ok=True)  # must not travel


def stage(tmp_path, condition, *extra, env=None, path=None):
    """`make image` with `extra` flags; never a real build: PATH holds no cog or docker unless a test
    puts fakes there."""
    base = {k: v for k, v in os.environ.items() if k != "CONTROLNET_WEIGHTS"}
    env = {**base, "PATH": path or str(tmp_path / "no-tools"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "scripts.build_image", condition, "--context", str(tmp_path / "context"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("condition", weights.IMAGES)
def test_make_image_stages_only_this_condition(tmp_path, condition):
    weights_root = tmp_path / "weights"
    for other in weights.IMAGES:  # every condition's weights present: only its own may travel
        if other != condition:
            fake_real_weights(weights_root, other)
    fake_real_weights(weights_root, condition)
    proc = stage(tmp_path, condition, "--stage-only", env={"CONTROLNET_WEIGHTS_DIR": str(weights_root)})
    assert proc.returncode == 0, proc.stderr
    context = tmp_path / "context"
    assert (context / "cog.yaml").read_text() == (ROOT / f"predictors/{condition}/cog.yaml").read_text()
    assert "cog==" not in (context / "requirements.txt").read_text()
    assert "torch==" in (context / "requirements.txt").read_text()
    assert sorted(p.name for p in (context / "weights").iterdir() if p.is_dir()) == sorted(
        set(weights.components(condition).values())
    )
    served = set(weights.conditions_of(condition))  # multi: every condition it combines, each its predictor
    assert sorted(p.name for p in (context / "predictors").iterdir() if p.is_dir()) == sorted(served | {condition})
    assert (context / f"predictors/{condition}/predict.py").is_file()
    assert not list((context / "predictors").glob("*/cog.yaml"))
    assert (context / "cog_base/predictor.py").is_file()
    detectors = {p.stem for p in (context / "models/detectors").glob("*.py")}
    needed = {predictor_module(c).Predictor.detector.partition(":")[0].rsplit(".", 1)[1] for c in served}
    assert needed <= detectors and not detectors & (set(weights.CONDITIONS) - served)
    assert f"ENV COG_PREDICT_TYPE_STUB=predictors/{condition}/predict.py:Predictor" in (context / "Dockerfile").read_text()


def test_staged_code_is_a_copy_weights_are_links_and_hub_bookkeeping_stays_out(tmp_path):
    weights_root = tmp_path / "weights"
    fake_real_weights(weights_root, "canny")
    controlnet = weights_root / weights.components("canny")["controlnet"]
    (controlnet / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (controlnet / ".cache/huggingface/download").mkdir(parents=True)
    (controlnet / ".cache/huggingface/download/x.metadata").write_text("etag")
    (controlnet / "unet.safetensors.incomplete").write_bytes(b"half")
    assert stage(tmp_path, "canny", "--stage-only", env={"CONTROLNET_WEIGHTS_DIR": str(weights_root)}).returncode == 0
    context = tmp_path / "context"
    staged = context / "weights" / controlnet.name
    assert (staged / "diffusion_pytorch_model.safetensors").stat().st_ino == (
        controlnet / "diffusion_pytorch_model.safetensors"
    ).stat().st_ino
    assert (staged / weights.MARKER).is_file()
    assert not (staged / ".cache").exists() and not list(staged.glob("*.incomplete"))
    staged_code = context / "cog_base/predictor.py"
    assert staged_code.stat().st_ino != (ROOT / "cog_base/predictor.py").stat().st_ino
    staged_code.write_text("edited in the build folder")  # must not reach the repo
    assert (ROOT / "cog_base/predictor.py").read_text() != "edited in the build folder"
    ignored = (context / ".dockerignore").read_text().split()
    assert "**/.cache" in ignored and "**/*.incomplete" in ignored


def test_tiny_weights_make_a_smoke_context_with_its_own_tag(tmp_path):
    proc = stage(tmp_path, "canny", "--stage-only", env={"CONTROLNET_WEIGHTS": "tiny"})
    assert proc.returncode == 0, proc.stderr
    assert '"tag": "controlnet-canny-smoke"' in proc.stdout
    staged = sorted(p.name for p in (tmp_path / "context/weights/tiny").iterdir())
    assert staged == sorted(weights.components("canny").values())


def test_every_missing_prerequisite_is_reported_at_once_before_staging(tmp_path):
    proc = stage(tmp_path, "canny", env={"CONTROLNET_WEIGHTS_DIR": str(tmp_path / "none")})
    assert proc.returncode != 0
    assert "make weights COND=canny" in proc.stderr and "Docker engine" in proc.stderr
    assert not (tmp_path / "context").exists()


def fake_tools(folder: Path, cog_version: str | None) -> str:
    """A `docker` whose `info` succeeds and, optionally, a `cog` of this version; both log their calls."""
    folder.mkdir()
    calls = folder / "calls"
    (folder / "docker").write_text(f'#!/bin/sh\necho "docker $*" >> {calls}\n[ "$1" = run ] && echo "{{}}"\nexit 0\n')
    if cog_version:
        (folder / "cog").write_text(
            f'#!/bin/sh\n[ "$1" = --version ] && echo "cog version {cog_version} (built 2026)" && exit 0\n'
            f'echo "cog $*" >> {calls}\n'
        )
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return str(folder)


def test_a_cog_cli_too_old_for_sdk_version_is_refused_with_the_minimum(tmp_path):
    path = fake_tools(tmp_path / "bin", "0.16.9")
    proc = stage(tmp_path, "canny", "--weights", "tiny", path=path)
    assert proc.returncode != 0
    assert "0.16.9" in proc.stderr and f">= {MIN_COG_CLI}" in proc.stderr
    assert not (tmp_path / "bin/calls").exists() or "build" not in (tmp_path / "bin/calls").read_text()


@pytest.mark.parametrize("cog_version", [MIN_COG_CLI, None])
def test_make_image_says_which_build_path_it_took(tmp_path, cog_version):
    path = fake_tools(tmp_path / "bin", cog_version)
    proc = stage(tmp_path, "canny", "--weights", "tiny", path=path)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "bin/calls").read_text()
    if cog_version:
        assert "`cog build`" in proc.stdout and "cog build -t controlnet-canny-smoke" in calls
    else:
        assert "plain `docker build`" in proc.stdout
        assert f"docker build -t controlnet-canny-smoke {tmp_path / 'context'}" in calls


def test_the_generated_dockerfile_follows_cogs_order_and_shares_its_dependency_layers():
    from scripts.build_image import DEPS_END, dockerfile

    heads = set()
    for condition in weights.IMAGES:
        text = dockerfile(condition)
        head, tail = text.split(DEPS_END)
        heads.add(head)
        steps = [line.split()[0] for line in text.splitlines() if line and not line.startswith("#")]
        loaders = 2 if has_field(condition, "train") else 1  # COG_PREDICT_CODE_STRIP (+ COG_TRAIN_CODE_STRIP)
        assert steps == ["ARG", "FROM", "ENV", "RUN", "ENTRYPOINT", "COPY", "ARG", "RUN", "RUN",
                         "WORKDIR", "EXPOSE", "ENV", *["ENV"] * loaders, "CMD", "COPY"]
        assert f'ENV COG_PREDICT_CODE_STRIP="from predictors.{condition}.predict import Predictor"' in tail
        assert f"cog=={pinned_sdk()}" in head and "-r /tmp/requirements.txt" in head
        assert tail.strip().splitlines()[-1] == "COPY . /src"  # code and weights last: a code change rebuilds one layer
    assert len(heads) == 1  # one pip layer for every condition


def test_gpu_configs_name_the_cuda_of_the_pinned_torch():
    import torch

    for condition in weights.IMAGES:
        assert field(condition, "cuda") == ".".join(torch.version.cuda.split(".")[:2])


def test_the_cog_config_label_is_the_cog_yaml_in_cogs_field_order():
    import yaml

    from scripts.build_image import cog_config_json

    for condition in weights.CONDITIONS:
        text = cog_config_json(condition)
        config = yaml.safe_load((ROOT / "predictors" / condition / "cog.yaml").read_text())
        assert json.loads(text) == config  # every field, none left out, none invented
        assert list(json.loads(text)) == ["build", "predict", *(["train"] if "train" in config else [])]
        assert " " not in text  # compact, as Go's json.Marshal writes it


FAKE_DOCKER = """#!{python}
# A docker that logs its arguments; `run IMAGE CMD...` runs CMD here, in the staged context (what the image holds).
import json, os, subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[0] == "run":
    entry = args.index("--entrypoint")
    command = [args[entry + 1], *args[entry + 3:]]
    command[0] = sys.executable if command[0] == "python" else command[0]
    env = {{**os.environ, "COG_PREDICT_CODE_STRIP": "from predictors.canny.predict import Predictor"}}
    sys.exit(subprocess.run(command, cwd={context!r}, env=env).returncode)
"""


def test_plain_docker_images_carry_the_labels_cog_build_writes(tmp_path):
    """What `docker inspect` and `cog predict IMAGE` read, checked without building an image: the labelling
    build's arguments, with the schema and pip freeze produced where the image's predictor would run."""
    import yaml

    folder = tmp_path / "bin"
    folder.mkdir()
    log = folder / "calls.jsonl"
    (folder / "docker").write_text(FAKE_DOCKER.format(python=sys.executable, log=str(log), context=str(tmp_path / "context")))
    (folder / "docker").chmod(0o755)
    proc = stage(tmp_path, "canny", "--weights", "tiny", path=f"{folder}:/usr/bin:/bin")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    (labelling,) = [c for c in calls if c[0] == "build" and "--label" in c]
    assert labelling[-3:] == ["-t", "controlnet-canny-smoke", "-"]  # FROM the built image, same tag
    labels = dict(labelling[i + 1].split("=", 1) for i, arg in enumerate(labelling) if arg == "--label")

    assert json.loads(labels["run.cog.config"]) == yaml.safe_load((ROOT / "predictors/canny/cog.yaml").read_text())
    assert labels["run.cog.version"] == pinned_sdk() and labels["run.cog.has_init"] == "true"
    schema = json.loads(labels["run.cog.openapi_schema"])
    inputs = schema["components"]["schemas"]["Input"]
    from cog_base.inputs import CONTROLS, JAGILLEY_INPUTS

    assert list(inputs["properties"]) == [*JAGILLEY_INPUTS, "low_threshold", "high_threshold", "controlnet_version",
                                         *CONTROLS]
    assert sorted(inputs["required"]) == ["image", "prompt"] and inputs["properties"]["ddim_steps"]["default"] == 20
    assert "/predictions" in schema["paths"] and schema["components"]["schemas"]["Output"]["type"] == "array"
    assert f"cog=={pinned_sdk()}" in labels["run.cog.pip_freeze"]
    # The standard OCI labels: a tiny-weights image carries only the project's own code and random weights.
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.title"] == "controlnet-canny"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert labels.get("org.opencontainers.image.revision") == (head or None)


def test_a_real_images_licence_label_names_its_weights():
    from scripts.build_image import image_labels

    assert image_labels("canny", "{}", tiny=False)["org.opencontainers.image.licenses"] == "Apache-2.0 AND CreativeML-OpenRAIL-M"
    pose = image_labels("pose", "{}", tiny=False)["org.opencontainers.image.licenses"]
    assert pose == "Apache-2.0 AND CreativeML-OpenRAIL-M AND LicenseRef-CMU-OpenPose-NonCommercial"
    lineart = image_labels("lineart", "{}", tiny=False)["org.opencontainers.image.licenses"]
    assert lineart == "Apache-2.0 AND CreativeML-OpenRAIL-M AND LicenseRef-Annotators-Unstated"
    softedge = image_labels("softedge", "{}", tiny=False)["org.opencontainers.image.licenses"]
    assert softedge == "Apache-2.0 AND CreativeML-OpenRAIL-M AND LicenseRef-Annotators-Unstated"
