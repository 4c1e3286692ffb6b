"""The release workflow and the cluster manifests, validated offline against their schemas."""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import weights
from scripts.cog_config import MIN_COG_CLI
from scripts.deploy_manifests import render

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github/workflows/release.yml"
KNATIVE_SCHEMA = json.loads((ROOT / "deploy/knative-service.schema.json").read_text())
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
    for pod in (revision["spec"], kinds["Deployment"]["spec"]["template"]["spec"]):
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
