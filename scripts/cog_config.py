"""Read the few fields we need from a condition's cog.yaml, with the standard library only
(`make image` runs before any virtualenv exists)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cog_yaml(condition: str) -> Path:
    path = ROOT / "predictors" / condition / "cog.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in (ROOT / "predictors").glob("*/cog.yaml"))
        raise SystemExit(f"unknown condition {condition!r}: no {path.relative_to(ROOT)} (known: {', '.join(known)})")
    return path


def field(condition: str, name: str) -> str:
    match = re.search(rf'^\s*{name}:\s*"?([^"\n]+?)"?\s*$', cog_yaml(condition).read_text(), re.MULTILINE)
    if not match:
        raise SystemExit(f"{cog_yaml(condition)} has no {name}:")
    return match.group(1)


def has_field(condition: str, name: str) -> bool:
    return re.search(rf"^\s*{name}:", cog_yaml(condition).read_text(), re.MULTILINE) is not None


def pinned_sdk() -> str:
    match = re.search(r"^cog==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    if not match:
        raise SystemExit("requirements.txt does not pin cog==VERSION")
    return match.group(1)


# `build.sdk_version` (which installs the pinned SDK in the image) exists from cog CLI 0.17.0 on; an
# older CLI rejects the config as having an unknown `build` key.
MIN_COG_CLI = "0.17.0"


def version_tuple(text: str) -> tuple[int, ...]:
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(n) for n in match.groups()) if match else ()


def loader_code(ref: str) -> str:
    """What Cog's HTTP process runs to find a predictor's signature (COG_PREDICT_CODE_STRIP).

    Cog 0.16.12's "fast loader" (cog/code_xforms.py) strips the predictor file down to its imports
    of `cog`, `typing` and a few others plus the class with emptied methods, so a predictor whose
    base and Inputs come from `cog_base` fails it ("name 'ControlNetPredictor' is not defined") and
    Cog logs that, then imports the file anyway. Cog reads this variable before stripping anything;
    given the import itself, it loads the real class at once. The predictor modules import only cog
    at module level, so this costs what the fallback cost, without the error line.
    """
    path, _, name = ref.partition(":")
    return f"from {path.removesuffix('.py').replace('/', '.')} import {name}"


def loader_env(condition: str) -> dict[str, str]:
    env = {"COG_PREDICT_CODE_STRIP": loader_code(field(condition, "predict"))}
    if has_field(condition, "train"):
        env["COG_TRAIN_CODE_STRIP"] = loader_code(field(condition, "train"))
    return env
