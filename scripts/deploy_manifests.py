"""`make deploy COND=x REF=registry/controlnet-x:tag`: one condition's cluster manifests from deploy/template/.

Writes build/deploy/<x>/knative.yaml (Knative Serving: queueing per pod, autoscaling on concurrency,
scale to zero) and build/deploy/<x>/kubernetes.yaml (Deployment + Service + Ingress where Knative is
not installed). Weights are baked into the image by default; `--weights-claim NAME` mounts a
PersistentVolumeClaim holding the weights root (the layout `make weights` writes) read-only at
/weights instead, for an image built without them.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import yaml

import weights

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "deploy" / "template"
WEIGHTS_MOUNT = "/weights"


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec")
    return [spec] if spec and "containers" in spec else []


def render(condition: str, image: str | None = None, weights_claim: str | None = None) -> dict[str, list[dict]]:
    """File name -> the documents it holds."""
    weights.components(condition)  # an unknown condition is an error that lists the known ones
    values = {"COND": condition, "IMAGE": image or f"controlnet-{condition}"}
    rendered = {}
    for template in sorted(TEMPLATES.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(string.Template(template.read_text()).substitute(values)) if d]
        for doc in docs:
            for pod in _pod_specs(doc) if weights_claim else []:
                pod.setdefault("volumes", []).append(
                    {"name": "weights", "persistentVolumeClaim": {"claimName": weights_claim, "readOnly": True}}
                )
                for container in pod["containers"]:
                    container.setdefault("volumeMounts", []).append(
                        {"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True}
                    )
                    container.setdefault("env", []).append({"name": "CONTROLNET_WEIGHTS_DIR", "value": WEIGHTS_MOUNT})
        rendered[template.name] = docs
    return rendered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("condition", choices=weights.IMAGES)
    parser.add_argument("--image", help="image reference (default controlnet-<condition>)")
    parser.add_argument("--weights-claim", help="mount this PersistentVolumeClaim at /weights instead of baked weights")
    parser.add_argument("--out", type=Path, help="output folder (default build/deploy/<condition>)")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "build" / "deploy" / args.condition
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in render(args.condition, args.image, args.weights_claim).items():
        (out / name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
        print(out / name)


if __name__ == "__main__":
    main()
