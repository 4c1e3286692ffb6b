"""`make deploy COND=x REF=registry/controlnet-x:tag`: one condition's cluster manifests from deploy/template/.

Writes build/deploy/<x>/knative.yaml (Knative Serving: queueing per pod, autoscaling on concurrency,
scale to zero), build/deploy/<x>/kserve.yaml (the same through KServe's InferenceService, custom
container) and build/deploy/<x>/kubernetes.yaml (Deployment + Service + Ingress where neither is
installed). Weights are baked into the image by default; `--weights-claim NAME` mounts a
PersistentVolumeClaim holding the weights root (the layout `make weights` writes) read-only at
/weights instead, for an image built without them. GPU nodes are chosen with `--node-selector
KEY=VALUE` and `--toleration KEY[=VALUE]:EFFECT` (each repeatable; Knative needs its
kubernetes.podspec-nodeselector / -tolerations features on for them).

Sized for real traffic: every timeout on the way (Knative's and KServe's request timeout, the
ingress-nginx proxy timeouts) is the longest prediction, `--timeout` (600 s); the ingress takes
bodies up to the server's own bound (CONTROLNET_MAX_BODY_MB, set in the container to the same
value); a stopping Deployment pod first waits for its running prediction (preStop), within a grace
period that covers it.
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
# A bound on the longest prediction, every timeout on its way and the drain before a stop (--timeout):
# image and LoRA downloads alone may take 30 s and 120 s; the GPU time of the largest request (100 steps,
# 4 samples, 2.4 MP) is not measured yet.
TIMEOUT_S = 600
MAX_BODY_MB = 64  # cog_base/cog016/serving.py's default for CONTROLNET_MAX_BODY_MB
ENDPOINT_DRAIN_S = 5  # for the Service to drop a stopping pod before it is asked whether it is busy
STOP_S = 10  # SIGTERM stops Cog within this (docs/serving.md, "Stopping")

# preStop of the Deployment's container: wait while Cog says BUSY (the running prediction finishes;
# Cog alone would abandon it 5 s after SIGTERM), at most the longest prediction. Python, because the
# image has it and no curl.
PRESTOP = """import json, time, urllib.request
time.sleep({drain})
end = time.monotonic() + {timeout}
while time.monotonic() < end:
    try:
        with urllib.request.urlopen("http://127.0.0.1:{port}/health-check", timeout=5) as answer:
            busy = json.loads(answer.read()).get("status") == "BUSY"
    except (OSError, ValueError):
        break
    if not busy:
        break
    time.sleep(1)
"""


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pods = [spec.get("template", {}).get("spec"), spec.get("predictor")]  # Deployment / Knative; KServe
    return [pod for pod in pods if pod and "containers" in pod]


def toleration(text: str) -> dict:
    """KEY[=VALUE]:EFFECT, e.g. nvidia.com/gpu:NoSchedule (any value) or gpu=true:NoSchedule."""
    key_value, sep, effect = text.rpartition(":")
    if not sep or not key_value or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY[=VALUE]:EFFECT, EFFECT one of NoSchedule, PreferNoSchedule, NoExecute")
    key, has_value, value = key_value.partition("=")
    return {"key": key, "operator": "Equal", "value": value, "effect": effect} if has_value else \
        {"key": key, "operator": "Exists", "effect": effect}


def node_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. cloud.google.com/gke-accelerator=nvidia-l4")
    return key, value


def render(
    condition: str, image: str | None = None, weights_claim: str | None = None, node_selector: dict | None = None,
    tolerations: list[dict] | None = None, timeout_s: int = TIMEOUT_S,
) -> dict[str, list[dict]]:
    """File name -> the documents it holds."""
    weights.components(condition)  # an unknown condition is an error that lists the known ones
    values = {
        "COND": condition, "IMAGE": image or f"controlnet-{condition}", "TIMEOUT_S": timeout_s,
        "GRACE_S": ENDPOINT_DRAIN_S + timeout_s + STOP_S + 5, "MAX_BODY_MB": MAX_BODY_MB,
    }
    # Host memory: the templates' 12/16 GiB hold an SD 1.5 image; another family declares its own (Z-Image's
    # 27 GB of bf16 weights pass through host memory while loading).
    memory = weights.FAMILIES.get(condition, {}).get("host_memory")
    rendered = {}
    for template in sorted(TEMPLATES.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(string.Template(template.read_text()).substitute(values)) if d]
        for doc in docs:
            for pod in _pod_specs(doc):
                if node_selector:
                    pod["nodeSelector"] = dict(node_selector)
                if tolerations:
                    pod["tolerations"] = list(tolerations)
                if memory:
                    for container in pod["containers"]:
                        resources = container.setdefault("resources", {})
                        resources.setdefault("requests", {})["memory"] = memory["request"]
                        resources.setdefault("limits", {})["memory"] = memory["limit"]
                if "terminationGracePeriodSeconds" in pod:  # the pods that stop by SIGTERM alone
                    for container in pod["containers"]:
                        code = PRESTOP.format(drain=ENDPOINT_DRAIN_S, timeout=timeout_s, port=5000)
                        container["lifecycle"] = {"preStop": {"exec": {"command": ["python", "-c", code]}}}
                if weights_claim:
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
    parser.add_argument("--image", help="the image reference your cluster pulls (make deploy's REF), e.g. "
                        "registry.example/controlnet-canny:1")
    parser.add_argument("--template", action="store_true",
                        help="no image yet: write the manifests with the placeholder image controlnet-<condition>")
    parser.add_argument("--weights-claim", help="mount this PersistentVolumeClaim at /weights instead of baked weights")
    parser.add_argument("--node-selector", type=node_label, action="append", default=[],
                        help="KEY=VALUE a GPU node must carry (repeatable)")
    parser.add_argument("--toleration", type=toleration, action="append", default=[],
                        help="KEY[=VALUE]:EFFECT of a GPU node taint to tolerate, e.g. nvidia.com/gpu:NoSchedule (repeatable)")
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help=f"the longest prediction in seconds ({TIMEOUT_S})")
    parser.add_argument("--out", type=Path, help="output folder (default build/deploy/<condition>)")
    args = parser.parse_args(argv)
    cond = args.condition
    if not args.image and not args.template:
        # A bare controlnet-<cond> is no reference a cluster can pull: say what to pass instead of writing it.
        raise SystemExit(
            f"make deploy: which image should the cluster run? Push it (make image COND={cond}, then docker push or "
            f"cog push) and pass its reference: make deploy COND={cond} REF=<registry>/controlnet-{cond}:<tag> "
            f"(or TEMPLATE=1 for manifests with the placeholder image controlnet-{cond}, to edit)")
    out = args.out or ROOT / "build" / "deploy" / cond
    out.mkdir(parents=True, exist_ok=True)
    files = render(cond, args.image, args.weights_claim, dict(args.node_selector), args.toleration, args.timeout)
    for name, docs in files.items():
        (out / name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
        print(out / name)
    if not args.image:
        print(f"These are a template: their image is the placeholder controlnet-{cond}; set your pushed image's "
              "reference in them (or run again with REF=...) before applying.")
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"Next, apply the one for your cluster:\n"
          f"  kubectl apply -f {shown}/knative.yaml      # Knative Serving installed\n"
          f"  kubectl apply -f {shown}/kserve.yaml       # KServe installed\n"
          f"  kubectl apply -f {shown}/kubernetes.yaml   # neither: Deployment + Service + Ingress")


if __name__ == "__main__":
    main()
