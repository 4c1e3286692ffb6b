"""The release workflow and the cluster manifests, validated offline against their schemas."""

import http.server
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import weights
from scripts.cog_config import MIN_COG_CLI
from scripts.deploy_manifests import MAX_BODY_MB, TIMEOUT_S, _pod_specs, render, toleration

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github/workflows/release.yml"
KNATIVE_SCHEMA = json.loads((ROOT / "deploy/knative-service.schema.json").read_text())
KSERVE_SCHEMA = json.loads((ROOT / "deploy/kserve-inferenceservice.schema.json").read_text())
KUBERNETES_VERSION = "1.33"


def test_release_workflow_is_valid_for_github():
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_release_workflow_tests_then_builds_and_pushes_every_condition():
    flow = yaml.safe_load(WORKFLOW.read_text())
    image = flow["jobs"]["image"]
    assert image["needs"] == "test" and ".ci/run" in str(flow["jobs"]["test"]["steps"])
    assert sorted(image["strategy"]["matrix"]["condition"]) == sorted(weights.IMAGES)
    runs = [step.get("run", "") for step in image["steps"]]
    order = [next(i for i, run in enumerate(runs) if word in run)
             for word in ("make weights", "scripts.build_image", "cog build --separate-weights", "cog push")]
    assert order == sorted(order)
    assert "secrets.REGISTRY" in str(image["steps"][order[3]])
    assert flow["env"]["COG_VERSION"] == f"v{MIN_COG_CLI}"
    # cog login takes a token on stdin only for r8.im; other registries need docker login (no terminal in CI).
    login = next(run for run in runs if "login" in run)
    assert "cog login --token-stdin" in login and "docker login" in login and "--password-stdin" in login


def knative_validator():
    return jsonschema.Draft7Validator(KNATIVE_SCHEMA)


@pytest.mark.parametrize("claim", [None, "controlnet-weights"])
@pytest.mark.parametrize("condition", weights.IMAGES)
def test_manifests_are_valid_and_serve_one_prediction_per_gpu_pod(condition, claim):
    files = render(condition, image=f"r.example/controlnet-{condition}:1", weights_claim=claim)
    (service,) = files["knative.yaml"]
    errors = [e.message for e in knative_validator().iter_errors(service)]
    assert not errors, errors
    (inference,) = files["kserve.yaml"]
    errors = [e.message for e in jsonschema.Draft7Validator(KSERVE_SCHEMA).iter_errors(inference)]
    assert not errors, errors
    assert inference["kind"] == "InferenceService" and inference["apiVersion"] == "serving.kserve.io/v1beta1"
    assert inference["spec"]["predictor"]["containerConcurrency"] == 1
    assert service["kind"] == "Service" and service["apiVersion"] == "serving.knative.dev/v1"
    revision = service["spec"]["template"]
    assert revision["spec"]["containerConcurrency"] == 1
    assert revision["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "0"
    kinds = {}
    for doc in files["kubernetes.yaml"]:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        kinds[doc["kind"]] = doc
    assert set(kinds) == {"Deployment", "Service", "Ingress"}
    paths = {p["path"] for rule in kinds["Ingress"]["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths == {"/predictions", "/health-check", "/openapi.json"}  # never /shutdown or /
    for pod in (revision["spec"], kinds["Deployment"]["spec"]["template"]["spec"], inference["spec"]["predictor"]):
        (container,) = pod["containers"]
        assert container["image"] == f"r.example/controlnet-{condition}:1"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["readinessProbe"]["exec"]["command"] == ["test", "-f", cog_ready_file()]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["CONTROLNET_SHUTDOWN_FROM"] == "none"  # Knative's queue-proxy reaches Cog from loopback
        mounted = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert (env.get("CONTROLNET_WEIGHTS_DIR"), mounted) == (("/weights", ["/weights"]) if claim else (None, []))


def cog_ready_file() -> str:
    """Where the pinned Cog writes its readiness file under Kubernetes (cog/server/probes.py)."""
    from cog.server.probes import ProbeHelper

    return str(ProbeHelper._root / "ready")


def test_the_vendored_knative_schema_rejects_a_misspelt_field():
    (service,) = render("canny")["knative.yaml"]
    service["spec"]["template"]["spec"]["containerConcurency"] = 1
    assert any("containerConcurency" in e.message for e in knative_validator().iter_errors(service))


def test_an_unknown_condition_is_refused():
    with pytest.raises(ValueError, match="known"):
        render("sketch")


def test_the_vendored_kserve_schema_rejects_a_misspelt_field():
    (inference,) = render("canny")["kserve.yaml"]
    inference["spec"]["predictor"]["containerConcurency"] = 1
    assert any("containerConcurency" in e.message for e in jsonschema.Draft7Validator(KSERVE_SCHEMA).iter_errors(inference))


def test_timeouts_and_body_size_fit_the_longest_prediction_and_the_largest_upload():
    files = render("canny", timeout_s=900)
    kinds = {doc["kind"]: doc for doc in files["kubernetes.yaml"]}
    (service,), (inference,) = files["knative.yaml"], files["kserve.yaml"]
    annotations = kinds["Ingress"]["metadata"]["annotations"]
    # ingress-nginx's defaults would cut a prediction at 60 s and refuse bodies over 1 MB.
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "900"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "900"
    assert service["spec"]["template"]["spec"]["timeoutSeconds"] == 900 == inference["spec"]["predictor"]["timeout"]
    # The ingress takes what the server takes: the container's bound is set to the same value, and it is
    # the server's own default.
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{MAX_BODY_MB}m"
    serving = (ROOT / "cog_base/cog016/serving.py").read_text()
    assert re.search(r'"CONTROLNET_MAX_BODY_MB", "(\d+)"', serving).group(1) == str(MAX_BODY_MB)
    pods = (kinds["Deployment"]["spec"]["template"]["spec"], service["spec"]["template"]["spec"], inference["spec"]["predictor"])
    for pod in pods:
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["CONTROLNET_MAX_BODY_MB"] == str(MAX_BODY_MB)
    # A stopping pod first lets its prediction finish, within the grace period.
    deployment = pods[0]
    assert deployment["terminationGracePeriodSeconds"] > 900 + 10
    assert "preStop" in deployment["containers"][0]["lifecycle"]
    assert render("canny")["knative.yaml"][0]["spec"]["template"]["spec"]["timeoutSeconds"] == TIMEOUT_S


class FakeCog(http.server.BaseHTTPRequestHandler):
    """/health-check says BUSY for the first `busy` asks, then READY."""
    asks = 0
    busy = 3

    def do_GET(self):
        type(self).asks += 1
        body = json.dumps({"status": "BUSY" if self.asks <= self.busy else "READY"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_prestop_hook_waits_while_a_prediction_runs():
    (deployment,) = [d for d in render("canny")["kubernetes.yaml"] if d["kind"] == "Deployment"]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeCog)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        code = command[2].replace("time.sleep(5)", "time.sleep(0)").replace(":5000/", f":{fake.server_address[1]}/")
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        # It asked until the server stopped being busy, and returned then.
        assert FakeCog.asks == FakeCog.busy + 1
        assert time.monotonic() - started >= FakeCog.busy * 1.0
    finally:
        fake.shutdown()
        fake.server_close()


def test_gpu_node_selection_and_tolerations_reach_every_pod():
    gpu = toleration("nvidia.com/gpu:NoSchedule")
    pinned = toleration("pool=gpu:NoExecute")
    assert gpu == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pinned == {"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}
    selector = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    files = render("canny", node_selector=selector, tolerations=[gpu, pinned])
    (service,), (inference,) = files["knative.yaml"], files["kserve.yaml"]
    assert not list(knative_validator().iter_errors(service))
    assert not list(jsonschema.Draft7Validator(KSERVE_SCHEMA).iter_errors(inference))
    pods = [service["spec"]["template"]["spec"], inference["spec"]["predictor"]]
    for doc in files["kubernetes.yaml"]:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] == "Deployment":
            pods.append(doc["spec"]["template"]["spec"])
    for pod in pods:
        assert pod["nodeSelector"] == selector and pod["tolerations"] == [gpu, pinned]
    # Without them, none: a cluster without those labels or taints still schedules the pods.
    assert all("nodeSelector" not in pod and "tolerations" not in pod
               for docs in render("canny").values() for doc in docs for pod in
               [doc.get("spec", {}).get("template", {}).get("spec") or doc.get("spec", {}).get("predictor") or {}])
    with pytest.raises(Exception, match="EFFECT"):
        toleration("nvidia.com/gpu")


def test_the_zimage_pods_ask_for_the_host_memory_its_weights_need():
    """Z-Image's 27 GB of bf16 weights pass through host memory while loading: its family declares 48/64 GiB;
    an SD 1.5 image keeps the templates' 12/16 GiB."""
    for condition, (request, limit) in (("zimage", ("48Gi", "64Gi")), ("canny", ("12Gi", "16Gi"))):
        pods = [pod for docs in render(condition, image=f"controlnet-{condition}:test").values()
                for doc in docs for pod in _pod_specs(doc)]
        assert len(pods) == 3
        for pod in pods:
            resources = pod["containers"][0]["resources"]
            assert (resources["requests"]["memory"], resources["limits"]["memory"]) == (request, limit), condition
