"""`python -m scripts.openapi_dump OUT_DIR`: every image's OpenAPI schema, as Cog's server builds it.

One file per image (`<cond>.json`; `<cond>.train.json` too where its cog.yaml has `train:`), each built
by Cog's own app factory from the image's cog.yaml in a fresh process (a schema build changes the
registry's Inputs, so no build sees another's leftovers). Run it before and after a change to the
predictors or the registry and `diff -r` the folders: the schema is what clients see.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def schema(condition: str, mode: str) -> dict:
    from cog_base.cog016.schema import served_schema

    return served_schema(ROOT / "predictors" / condition / "cog.yaml", train=mode == "train")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:  # the child: one image's schema into a file (Cog logs to stdout)
        Path(argv[3]).write_text(json.dumps(schema(argv[1], argv[2]), indent=2, sort_keys=True) + "\n")
        return 0
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p.parent for p in (ROOT / "predictors").glob("*/cog.yaml")):
        config = yaml.safe_load((folder / "cog.yaml").read_text())
        for mode in ("predict", "train") if "train" in config else ("predict",):
            name = folder.name if mode == "predict" else f"{folder.name}.train"
            path = (out / f"{name}.json").resolve()
            subprocess.run([sys.executable, "-m", "scripts.openapi_dump", "--one", folder.name, mode, str(path)],
                           cwd=ROOT, check=True, capture_output=True)
            print(f"{name}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
