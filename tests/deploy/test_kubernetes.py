"""Kubernetes manifests: valid against the Kubernetes API schemas (kubernetes-validate ships them), and consistent
with each other, with the images and with the server."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from tests.deploy.helpers import DEPLOY, K8S_FILES, containers, dockerfile, k8s_resources

# The oldest Kubernetes minor still commonly run, and the newest the validator knows.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def by_kind(kind: str) -> list[dict]:
    return [r for _, r in k8s_resources() if r["kind"] == kind]


def test_every_manifest_is_schema_valid_in_strict_mode():
    assert len(K8S_FILES) >= 7
    for _, resource in k8s_resources():
        for version in VERSIONS:
            # strict: unknown fields fail too (a misspelt `readinesProbe` would otherwise pass silently).
            kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),
        lambda d: d["spec"].update(replicas="two"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_the_validator_rejects_a_broken_deployment(break_it):
    deployment = copy.deepcopy(by_kind("Deployment")[0])
    break_it(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_deployments_probe_health_and_run_as_the_image_user():
    uid = int(dockerfile(DEPLOY / "Dockerfile").args["UID"])
    deployments = by_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"supernet", "supernet-gpu", "supernet-gpu-tp2"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
        (container,) = containers(deployment)
        port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert int(env.get("SUPERNET_PORT", 8000)) == port  # the image listens on SUPERNET_PORT (8000)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        # the pod outlives the server's drain (--shutdown-timeout) before it is killed
        assert pod["terminationGracePeriodSeconds"] > float(env["SUPERNET_SHUTDOWN_TIMEOUT"])
        # the presets ConfigMap is mounted where SUPERNET_PRESETS points; a model path lies on a mounted volume
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(mounts) <= set(volumes)
        if "SUPERNET_PRESETS" in env:
            (name,) = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == "supernet-presets"]
            assert env["SUPERNET_PRESETS"] == mounts[name] + "/presets.yaml"
        if "SUPERNET_MODEL" in env:
            assert any(env["SUPERNET_MODEL"].startswith(path + "/") for path in mounts.values())


def test_gpu_variants_request_nvidia_gpus_and_the_tensor_parallel_one_matches_its_size():
    gpu = {d["metadata"]["name"]: containers(d)[0] for d in by_kind("Deployment") if "gpu" in d["metadata"]["name"]}
    for name, container in gpu.items():
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert container["image"].endswith(":cuda") and env["SUPERNET_BACKEND"] == "vllm"
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"], name  # extended resources: equal
        expected = int(env.get("SUPERNET_TENSOR_PARALLEL_SIZE", 1))
        assert limits["nvidia.com/gpu"] == expected, name
    tp2 = {e["name"]: e.get("value") for e in gpu["supernet-gpu-tp2"]["env"]}
    assert int(tp2["SUPERNET_TENSOR_PARALLEL_SIZE"]) == 2


def test_services_select_their_deployments_and_hpa_targets_a_real_one():
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    for service in by_kind("Service"):
        selector = service["spec"]["selector"].items()
        matched = [n for n, d in deployments.items() if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert matched, service["metadata"]["name"]
        for name in matched:
            ports = {p["name"] for p in containers(deployments[name])[0]["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "supernet_requests_waiting"  # exported by the server
    assert metrics["Resource"]["resource"]["name"] == "cpu"


def test_the_presets_configmap_loads_for_the_demo_supernet(tmp_path):
    import json

    import supernet
    from serving.presets import load_presets_file

    (configmap,) = by_kind("ConfigMap")
    path = tmp_path / "presets.yaml"
    path.write_text(configmap["data"]["presets.yaml"])
    layers = json.loads((supernet.DEMO_DIR / "config.json").read_text())["num_hidden_layers"]
    table = load_presets_file(path, layers)
    demo = yaml.safe_load((supernet.DEMO_DIR / "presets.yaml").read_text())
    assert table.default == demo["default"]
    assert set(table.names) <= {p["name"] for p in demo["presets"]}
