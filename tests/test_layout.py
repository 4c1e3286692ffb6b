"""The repo's own invariants: one list of conditions, Cog configs that agree with the pins, and image
build contexts that carry only their own condition."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import weights
from scripts.cog_config import field, pinned_sdk

ROOT = Path(__file__).resolve().parent.parent


def test_conditions_match_the_predictors_folders():
    folders = sorted(p.name for p in (ROOT / "predictors").iterdir() if (p / "predict.py").is_file())
    assert folders == sorted(weights.CONDITIONS)


def test_readme_table_lists_every_condition_once():
    rows = re.findall(r"^\| `(\w+)` \|", (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    conditions = [row for row in rows if (ROOT / "predictors" / row).is_dir()]
    assert sorted(conditions) == sorted(weights.CONDITIONS)


def test_every_cog_yaml_pins_the_sdk_and_requirements_the_tests_use():
    import cog

    assert cog.__version__ == pinned_sdk()
    for condition in weights.CONDITIONS:
        assert field(condition, "sdk_version") == pinned_sdk()
        assert field(condition, "python_requirements") == "requirements.txt"
        assert field(condition, "gpu") == "true"
        assert field(condition, "predict") == f"predictors/{condition}/predict.py:Predictor"


def test_cog_stays_out_of_the_model_code():
    for path in (ROOT / "models").rglob("*.py"):
        text = path.read_text()
        assert "import cog" not in text and "from cog" not in text, path


def fake_real_weights(root: Path, condition: str) -> None:
    for name in weights.components(condition).values():
        if (root / name).exists():
            continue
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
        weights.write_marker(root / name, revision=weights.MANIFEST["components"][name]["revision"])
    (root / "tiny" / "not-this").mkdir(parents=True, exist_ok=True)  # must not travel


@pytest.mark.parametrize("condition", weights.CONDITIONS)
def test_make_image_stages_only_this_condition_and_explains_what_is_missing(tmp_path, condition):
    weights_root = tmp_path / "weights"
    for other in weights.CONDITIONS:  # every condition's weights present: only its own may travel
        if other != condition:
            fake_real_weights(weights_root, other)
    fake_real_weights(weights_root, condition)
    context = tmp_path / "context"
    env = {**os.environ, "CONTROLNET_WEIGHTS_DIR": str(weights_root), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        ["/usr/bin/env", "python3", "-m", "scripts.build_image", condition, "--context", str(context)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    if proc.returncode == 0:  # a machine with cog and Docker built it for real
        return
    assert "cog CLI" in proc.stderr and f"cog build -t controlnet-{condition}" in proc.stderr
    assert (context / "cog.yaml").read_text() == (ROOT / f"predictors/{condition}/cog.yaml").read_text()
    assert "cog==" not in (context / "requirements.txt").read_text()
    assert "torch==" in (context / "requirements.txt").read_text()
    assert sorted(p.name for p in (context / "weights").iterdir() if p.is_dir()) == sorted(
        weights.components(condition).values()
    )
    assert sorted(p.name for p in (context / "predictors").iterdir() if p.is_dir()) == [condition]
    assert (context / f"predictors/{condition}/predict.py").is_file()
    assert not (context / f"predictors/{condition}/cog.yaml").exists()
    assert (context / "cog_base/predictor.py").is_file()
    detectors = sorted(p.name for p in (context / "models/detectors").glob("*.py"))
    assert detectors == sorted(["__init__.py", f"{condition}.py"])


def test_make_image_without_real_weights_names_the_fix(tmp_path):
    env = {**os.environ, "CONTROLNET_WEIGHTS_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.build_image", "canny", "--context", str(tmp_path / "c")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "make weights COND=canny" in proc.stderr
