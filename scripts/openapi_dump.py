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
    from cog.config import Config
    from cog.mode import Mode
    from cog.server.http import create_app

    config = yaml.safe_load((ROOT / "predictors" / condition / "cog.yaml").read_text())
    app = create_app(cog_config=Config(config), shutdown_event=None, is_build=True,
                     mode=Mode.TRAIN if mode == "train" else Mode.PREDICT)
    return app.openapi()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:  # the child: one image's schema on stdout
        print(json.dumps(schema(argv[1], argv[2]), indent=2, sort_keys=True))
        return 0
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p.parent for p in (ROOT / "predictors").glob("*/cog.yaml")):
        config = yaml.safe_load((folder / "cog.yaml").read_text())
        for mode in ("predict", "train") if "train" in config else ("predict",):
            text = subprocess.run([sys.executable, "-m", "scripts.openapi_dump", "--one", folder.name, mode],
                                  cwd=ROOT, check=True, capture_output=True, text=True).stdout
            name = folder.name if mode == "predict" else f"{folder.name}.train"
            (out / f"{name}.json").write_text(text)
            print(f"{name}: {len(text)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
