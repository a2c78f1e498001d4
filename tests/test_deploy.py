"""Deployment files (GPU, not run here): they parse and agree with the code."""

from __future__ import annotations

from pathlib import Path

import yaml

from facetron.paths import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def test_k8s_manifest() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= set(kinds)
    dep = kinds["Deployment"]
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    svc_targets = {p["targetPort"] for p in kinds["Service"]["spec"]["ports"]}
    assert svc_targets <= set(ports)
    assert kinds["Service"]["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]


def test_compose_file() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert len(services) >= 2
    host_ports = [p.split(":")[1] for s in services.values() for p in s["ports"]]
    assert len(host_ports) == len(set(host_ports)), "replicas must not share host ports"
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s["ports"]), "bind loopback on the host"


def test_dockerfile_matches_the_repository() -> None:
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM nvcr.io/nvidia/tritonserver:")
    copies = [ln.split()[1] for ln in lines if ln.startswith("COPY")]
    for src in copies:
        if not src.startswith("build/"):
            assert (REPO_ROOT / src.rstrip("/")).exists(), src
    for req in ("requirements/base.txt", "requirements/nodeps.txt"):
        assert req in " ".join(lines) and (REPO_ROOT / req).is_file()
    assert any("--model-repository=/models" in ln for ln in lines)
