"""The deployment files in etc/ and the Dockerfile, checked with the tools an operator would use where they exist
here: ``systemd-analyze verify``, the Kubernetes schemas (kubernetes-validate), the image's own health check run
against a real server. What needs a Docker engine or a cluster cannot run here (see the README)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from genai_server import __version__
from genai_server.exit_status import NOT_RETRIED
from genai_server.settings import Settings
from tests.harness.process import REPO, ServerProcess, free_port, server_env

UNIT = REPO / "etc" / "genai-server.service"
MANIFEST = REPO / "etc" / "kubernetes.yaml"
AUTOSCALER = REPO / "etc" / "kubernetes-hpa.yaml"
ADAPTER_VALUES = REPO / "etc" / "prometheus-adapter-values.yaml"
DOCKERFILE = REPO / "Dockerfile"
# The oldest Kubernetes release still supported upstream, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())


# ---- systemd --------------------------------------------------------------------------------------------------


def _unit_sections(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            current[key] = value
    return sections


def test_the_unit_restarts_crashes_but_not_a_configuration_that_cannot_work() -> None:
    unit = _unit_sections(UNIT.read_text())
    assert {"StartLimitIntervalSec", "StartLimitBurst"} <= unit["Unit"].keys()
    assert not {"StartLimitIntervalSec", "StartLimitBurst"} & unit["Service"].keys(), "ignored in [Service]"
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert sorted(int(status) for status in service["RestartPreventExitStatus"].split()) == sorted(NOT_RETRIED)
    assert 1 not in NOT_RETRIED, "a crash is restarted"
    # The console script the distribution installs; the stop timeout outlasts the drain.
    assert service["ExecStart"].endswith("/bin/genai-server")
    default_drain = Settings.model_fields["shutdown_timeout"].default
    assert int(service["TimeoutStopSec"]) > default_drain + 6


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """The unit as shipped, but for ExecStart, which must exist on this machine to verify: the running interpreter."""
    unit = tmp_path / "genai-server.service"
    text = re.sub(r"^ExecStart=.*$", f"ExecStart={sys.executable} -m genai_server", UNIT.read_text(), flags=re.M)
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# ---- Kubernetes -----------------------------------------------------------------------------------------------


def _manifest() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in _manifest() if doc["kind"] == kind]
    return doc


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", [MANIFEST, AUTOSCALER])
def test_the_manifests_follow_the_kubernetes_schemas(manifest: Path, version: str) -> None:
    """Strict: an unknown or misplaced field is an error, as the API server's own validation makes it."""
    for doc in yaml.safe_load_all(manifest.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_misplaced_field() -> None:
    deployment = _one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["preStopp"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards)
    refuses in a pod spec: its baseline host and privilege rules, and the restricted ones."""
    found = [f"spec.{key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    found += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= _RESTRICTED_VOLUMES]
    pod_context = pod.get("securityContext", {})
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = {**pod_context, **container.get("securityContext", {})}
        name = container["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
            found.append(f"{name}: must run as non-root")
        if context.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities must drop ALL")
        if any("hostPort" in port for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


def test_the_pod_passes_the_restricted_pod_security_standard() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    del pod["securityContext"]["seccompProfile"]
    del pod["containers"][0]["securityContext"]["seccompProfile"]
    assert restricted_violations(pod) == ["genai-server: seccompProfile must be RuntimeDefault or Localhost"]


def test_the_manifest_names_what_it_needs_and_drains_before_it_stops() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # An image tag that exists: the package's version, never :latest (which forces a pull).
    assert container["image"] == f"genai-server:{__version__}" and container["imagePullPolicy"] == "IfNotPresent"
    assert f"docker build -t genai-server:{__version__} ." in MANIFEST.read_text()
    # The claim it mounts is created here; the key Secret is a documented prerequisite (no key in the repo).
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {_one("PersistentVolumeClaim")["metadata"]["name"]}
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert all(f"kubectl create secret generic {name}" in MANIFEST.read_text() for name in secrets)
    # The pause before SIGTERM, then the drain, then the server's own margin all fit in the grace period.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = next(float(e["value"]) for e in container["env"] if e["name"] == "SHUTDOWN_TIMEOUT")
    assert pause >= 5 and pod["terminationGracePeriodSeconds"] > pause + drain + 6


def test_the_autoscaler_owns_the_count_and_every_pod_can_mount_the_model() -> None:
    """replicas: 2 on a ReadWriteOnce claim (a second node cannot mount it), and a replica count beside an
    autoscaler that owns it (every apply reset it)."""
    (hpa,) = yaml.safe_load_all(AUTOSCALER.read_text())
    deployment = _one("Deployment")
    assert "replicas" not in deployment["spec"]
    if hpa["spec"]["maxReplicas"] > 1:
        modes = set(_one("PersistentVolumeClaim")["spec"]["accessModes"])
        assert modes & {"ReadWriteMany", "ReadOnlyMany"}, modes
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    threads = next(e["value"] for e in container["env"] if e["name"] == "ENGINE_THREADS")
    assert threads == container["resources"]["requests"]["cpu"]  # the engine computes on what the pod asked for
    assert container["livenessProbe"]["timeoutSeconds"] >= 5


def test_the_autoscaler_reads_a_gauge_the_server_exports_through_the_adapters_rule(tmp_path: Path) -> None:
    """Deployment -> scrape annotations -> adapter rule -> HPA metric: each link names the next one right, and the
    gauge is one a real server exports."""
    (hpa,) = yaml.safe_load_all(AUTOSCALER.read_text())
    deployment = _one("Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "genai-server"}
    assert deployment["metadata"]["name"] == "genai-server"
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    (metric,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert rule["name"]["as"] == metric and rule["seriesQuery"].startswith(metric + "{")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
    with (
        ServerProcess(tmp_path / "server.log") as server,
        urllib.request.urlopen(f"{server.wait_healthy().url}{annotations['prometheus.io/path']}", timeout=10) as resp,
    ):
        exposition = resp.read().decode()
    assert f"# TYPE {metric} gauge" in exposition


# ---- Docker ---------------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in lines]


def _ignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip()[:1] not in "#"]
    return any(fnmatch.fnmatch(path + "/", p) or fnmatch.fnmatch(path, p.rstrip("/")) for p in patterns)


def test_the_image_copies_only_what_exists_and_is_in_its_context() -> None:
    copies = [args.split()[:-1] for op, args in _dockerfile_instructions() if op == "COPY"]
    sources = [source for sources in copies for source in sources]
    assert sources, "the Dockerfile copies something"
    for source in sources:
        assert (REPO / source).exists(), source
        assert not _ignored(source), f"{source} is excluded by .dockerignore"
    for heavy in ("models", ".venv", ".git", ".cache"):
        assert _ignored(heavy), f"{heavy} would be sent to the Docker daemon"


def test_the_image_starts_the_installed_console_script() -> None:
    (cmd,) = [json.loads(args) for op, args in _dockerfile_instructions() if op == "CMD"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd == ["genai-server"] and "genai-server" in scripts


def test_the_image_health_check_needs_only_python_and_tells_up_from_down(tmp_path: Path) -> None:
    """The HEALTHCHECK's own command (exec form: no shell, no curl; the slim base has neither curl nor wget), run
    as Docker runs it, against a real server and against a port nothing listens on."""
    (check,) = [args for op, args in _dockerfile_instructions() if op == "HEALTHCHECK"]
    command = json.loads(check.split("CMD", 1)[1])
    assert command[0] == "python"
    with ServerProcess(tmp_path / "server.log") as server:
        server.wait_healthy()
        up = subprocess.run([sys.executable, *command[1:]], env=server_env(SERVER_PORT=str(server.port)), timeout=30)
    down = subprocess.run(
        [sys.executable, *command[1:]], env=server_env(SERVER_PORT=str(free_port())), capture_output=True, timeout=30
    )
    assert (up.returncode, down.returncode) == (0, 1)
