"""Deployment files (not built or applied here: no Docker engine, no cluster,
no GPU): what can be checked is checked.

* the Kubernetes manifests are rendered (every document of every file) and
  validated against the Kubernetes JSON schemas (``kubernetes-validate``,
  which bundles them: no network), strict mode;
* they hold the rules of the design: headless Service (clients spread load
  themselves), startupProbe, readiness on ``/v2/health/ready``, the users
  volume written only by the training Job, resource requests per variant,
  versioned image tags;
* the Dockerfile's targets install exactly one ONNX Runtime package each,
  copy what exists, run as a numeric non-root user, and start through an
  entry point that runs ``facetron serve`` (tests/test_launch_commands.py
  parses what it runs); the pods run as non-root with a read-only root, no
  service-account token, and a NetworkPolicy;
* every pinned package the image installs supports the image's Python: pip
  itself (``pip index versions --python-version``) lists the versions whose
  Requires-Python admits it. ``FACETRON_DOCKERFILE=path`` checks another
  Dockerfile (how the mismatch was shown once; the suite also checks that a
  Python 3.10 copy fails).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from facetron.paths import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
MANIFESTS = ("k8s.yaml", "k8s-cpu.yaml")
K8S_VERSION = "1.30"
ORT_FILES = {"cpu": "onnxruntime-cpu.txt", "gpu": "onnxruntime-gpu.txt"}
#: the oldest glibc of the two images (python:3.11-slim-bookworm: 2.36; NGC 25.08 = Ubuntu 24.04: 2.39);
#: 2.35 kept: the wheels must also run where nvidia-pytriton 0.7.0 does (glibc >= 2.35)
IMAGE_GLIBC = (2, 35)


def project_version() -> str:
    import tomllib

    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def dockerfile_path() -> Path:
    return Path(os.environ.get("FACETRON_DOCKERFILE") or DEPLOY / "Dockerfile")


def render(name: str) -> list[dict]:
    """Every document of a manifest file (YAML parsed; nothing templated)."""
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def all_docs() -> list[dict]:
    return [d for name in MANIFESTS for d in render(name)]


def of_kind(kind: str) -> list[dict]:
    return [d for d in all_docs() if d["kind"] == kind]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


# --- Kubernetes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_validate_against_the_kubernetes_schemas(name: str) -> None:
    import kubernetes_validate

    docs = render(name)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_a_schema_violation_is_caught() -> None:
    import kubernetes_validate

    bad = render("k8s.yaml")[0]
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_servers_are_probed_and_spread_by_clients() -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    services = {d["metadata"]["name"]: d for d in of_kind("Service")}
    assert set(deployments) == {"facetron-triton", "facetron-triton-cpu"}
    for name, dep in deployments.items():
        assert dep["spec"]["replicas"] >= 2
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels
        c = pod_spec(dep)["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
        assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300, "slow starts"
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        svc = services[name]
        assert svc["spec"]["clusterIP"] == "None", "headless: a ClusterIP Service pins each gRPC connection to one pod"
        assert svc["spec"]["selector"] == labels
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["users"]["readOnly"] is True, "servers only read the users volume"


def test_resources_per_variant() -> None:
    gpu = pod_spec(next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "facetron-triton"))
    cpu = pod_spec(next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "facetron-triton-cpu"))
    g, c = gpu["containers"][0]["resources"], cpu["containers"][0]["resources"]
    assert g["requests"]["nvidia.com/gpu"] == g["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(g["requests"])
    assert "nvidia.com/gpu" not in c["requests"] and "nvidia.com/gpu" not in c.get("limits", {})
    assert {"cpu", "memory"} <= set(c["requests"])
    assert gpu["containers"][0]["image"].endswith("-gpu") and cpu["containers"][0]["image"].endswith("-cpu")


def test_a_training_job_writes_the_users_volume() -> None:
    jobs = of_kind("Job")
    assert {j["spec"]["template"]["spec"]["containers"][0]["image"].rsplit("-", 1)[1] for j in jobs} == {"cpu", "gpu"}
    claims = {d["metadata"]["name"]: d for d in of_kind("PersistentVolumeClaim")}
    assert "ReadWriteMany" in claims["facetron-users"]["spec"]["accessModes"]
    for job in jobs:
        spec = pod_spec(job)
        assert spec["restartPolicy"] in ("Never", "OnFailure")
        c = spec["containers"][0]
        assert c["args"][0] == "train"
        users = next(m for m in c["volumeMounts"] if m["name"] == "users")
        assert not users.get("readOnly", False), "the Job writes the users volume"
        volume = next(v for v in spec["volumes"] if v["name"] == "users")
        assert volume["persistentVolumeClaim"]["claimName"] == "facetron-users"
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])


def test_image_tags_are_versions() -> None:
    version = project_version()
    images = [c["image"] for d in all_docs() if d["kind"] in ("Deployment", "Job") for c in pod_spec(d)["containers"]]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    images += [s["image"] for s in compose["services"].values()]
    for image in images:
        tag = image.rsplit(":", 1)[1]
        assert tag in (f"{version}-cpu", f"{version}-gpu"), f"{image}: tag must be <facetron version>-<target>"


def test_compose_file() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    triton = {k: v for k, v in services.items() if k.startswith("triton")}
    assert len(triton) >= 2
    host_ports = [p.split(":")[1] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "replicas must not share host ports"
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", [])), "bind loopback"
    assert all(":ro" in v for s in triton.values() for v in s["volumes"] if v.endswith("/users:ro")), "servers read users"
    web = services["web"]["command"]
    assert web[:2] == ["facetron", "web"] and "--server" in web


# --- the image ---------------------------------------------------------------------------


def docker_lines(path: Path) -> list[str]:
    """Instructions with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def stages(lines: list[str]) -> dict[str, list[str]]:
    """Stage name -> its instructions (FROM ... AS name)."""
    out: dict[str, list[str]] = {}
    current = None
    for ln in lines:
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", ln, re.I)
        if m:
            current = m.group(1) or f"stage{len(out)}"
            out[current] = [ln]
        elif current is not None:
            out[current].append(ln)
    return out


def stage_chain(all_stages: dict[str, list[str]], name: str) -> list[str]:
    """The instructions of ``name`` and every stage it is built FROM, base first."""
    lines = all_stages[name]
    base = lines[0].split()[1]
    return (stage_chain(all_stages, base) if base in all_stages else []) + lines


def test_dockerfile_targets() -> None:
    lines = docker_lines(DEPLOY / "Dockerfile")
    st = stages(lines)
    assert {"cpu", "gpu"} <= set(st)
    installer = (DEPLOY / "install_venv.sh").read_text()
    assert "requirements/onnxruntime-$TARGET.txt" in installer and "dev.txt" not in installer
    for target in ("cpu", "gpu"):
        chain = stage_chain(st, target)
        runs = [ln for ln in chain if ln.startswith("RUN") and "install_venv.sh" in ln]
        assert len(runs) == 1 and re.search(rf"install_venv\.sh \S+ {target}\b", runs[0]), runs
        ort = [f for f in ORT_FILES.values() if (REPO_ROOT / "requirements" / f).is_file()]
        assert ORT_FILES[target] in ort
        pins = [ln.split("#")[0].split("==")[0].strip()
                for ln in (REPO_ROOT / "requirements" / ORT_FILES[target]).read_text().splitlines() if ln.split("#")[0].strip()]
        assert len(pins) == 1 and pins[0].startswith("onnxruntime"), f"{target}: exactly one ONNX Runtime package"
        assert any("ENTRYPOINT" in ln and "entrypoint.sh" in ln for ln in chain)
        assert any("HF_HUB_OFFLINE=1" in ln for ln in chain)
    base = [ln.split("#")[0] for ln in (REPO_ROOT / "requirements/base.txt").read_text().splitlines()]
    assert not any(ln.startswith("onnxruntime") for ln in base), "the ORT package is chosen per target"
    for ln in lines:
        if ln.startswith("COPY") and "--from" not in ln:
            src = ln.split()[1]
            if not src.startswith("build/"):
                assert (REPO_ROOT / src.rstrip("/")).exists(), src


def test_entrypoint_serves_through_facetron_serve() -> None:
    """Both targets start with `facetron serve` (the flags are built once, in facetron.triton.server;
    tests/test_launch_commands.py parses what each container runs)."""
    script = DEPLOY / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "exec facetron serve" in text and "exec tritonserver" not in text
    assert "--load-model=*" not in text and "'*'" not in text, "merged mode loads the base models by name"
    assert "restricted" not in text.replace("restricted in every mode", ""), "no restricted flags written by hand"


# --- nobody runs as root --------------------------------------------------------------------


def root_users(path: Path) -> list[str]:
    """Targets of the Dockerfile whose last USER (base stages included) is missing, 0 or root."""
    st = stages(docker_lines(path))
    bad = []
    for target in ("cpu", "gpu"):
        users = [ln.split()[1] for ln in stage_chain(st, target) if ln.upper().startswith("USER ")]
        user = users[-1].split(":")[0] if users else None
        if user and user.startswith("${"):
            m = re.search(rf"^ARG\s+{re.escape(user[2:-1])}=(\S+)", path.read_text(), re.M)
            user = m.group(1) if m else None
        if user is None or not user.isdigit() or int(user) == 0:
            bad.append(f"{target}: USER {users[-1] if users else 'missing'}")
    return bad


def test_images_run_as_a_numeric_non_root_user(tmp_path: Path) -> None:
    assert root_users(DEPLOY / "Dockerfile") == []
    copy = tmp_path / "Dockerfile"
    copy.write_text(re.sub(r"^USER .*$", "USER root", (DEPLOY / "Dockerfile").read_text(), count=1, flags=re.M))
    assert root_users(copy) == ["cpu: USER root"]


def root_pods(docs: list[dict]) -> list[str]:
    """Pods (Deployments, Jobs) whose containers could run as root or escalate."""
    bad = []
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(doc)
        pod = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            bad.append(f"{doc['metadata']['name']}: service-account token mounted")
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            bad.append(f"{doc['metadata']['name']}: no RuntimeDefault seccomp profile")
        for c in spec["containers"]:
            sc = {**pod, **c.get("securityContext", {})}
            where = f"{doc['metadata']['name']}/{c['name']}"
            if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", 1) == 0:
                bad.append(f"{where}: may run as root")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{where}: privilege escalation allowed")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                bad.append(f"{where}: capabilities not dropped")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad.append(f"{where}: writable root filesystem")
            elif not any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])):
                bad.append(f"{where}: read-only root without a /tmp volume")
    return bad


def test_no_pod_runs_as_root() -> None:
    docs = all_docs()
    assert root_pods(docs) == []
    pod_spec(docs[0])["containers"][0]["securityContext"]["runAsUser"] = 0
    pod_spec(docs[0]).pop("automountServiceAccountToken")
    assert len(root_pods(docs)) == 2


def test_network_policies_admit_grpc_from_clients_and_metrics_from_monitoring() -> None:
    policies = {d["spec"]["podSelector"]["matchLabels"]["app"]: d for d in of_kind("NetworkPolicy")}
    for dep in of_kind("Deployment"):
        app = dep["spec"]["template"]["metadata"]["labels"]["app"]
        policy = policies[app]["spec"]
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []
        rules = {tuple(p["port"] for p in r["ports"]): r["from"] for r in policy["ingress"]}
        assert set(rules) == {(8001,), (8002,)}, "gRPC and metrics only (HTTP 8000 is for the kubelet's probes)"
        assert rules[(8001,)] == [{"podSelector": {"matchLabels": {"facetron.io/client": "true"}}}]
        (monitoring,) = rules[(8002,)]
        assert monitoring["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


# --- pins vs the image's Python ----------------------------------------------------------


def image_python(path: Path, target: str = "cpu") -> str:
    """``X.Y`` of the Python that runs facetron in the ``target`` image (ARG FACETRON_PYTHON=X.Y;
    the gpu image: FACETRON_GPU_PYTHON, the NGC image's own Python, when the Dockerfile has it)."""
    text = path.read_text()
    m = target == "gpu" and re.search(r"^ARG\s+FACETRON_GPU_PYTHON=(\d+)\.(\d+)\s*$", text, re.M)
    m = m or re.search(r"^ARG\s+FACETRON_PYTHON=(\d+)\.(\d+)\s*$", text, re.M)
    assert m, f"{path}: no ARG FACETRON_PYTHON=X.Y"
    return f"{m.group(1)}.{m.group(2)}"


def image_pins(path: Path) -> dict[str, str]:
    """name -> pinned version of every requirements file the image installs
    (deploy/install_venv.sh's ``-r`` files, both ONNX Runtime files)."""
    assert "install_venv.sh" in path.read_text(), f"{path}: does not build the venv with deploy/install_venv.sh"
    text = (DEPLOY / "install_venv.sh").read_text()
    files = sorted({f for f in re.findall(r"(requirements/[\w.$-]+\.txt)", text) if "$" not in f}
                   | {f"requirements/{f}" for f in ORT_FILES.values()})
    pins = {}
    for f in files:
        for line in (REPO_ROOT / f).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, sep, version = line.partition("==")
                assert sep, f"{f}: {line!r} is not pinned with =="
                pins[re.sub(r"\[.*\]", "", name).strip()] = version.strip()
    return pins


@lru_cache(maxsize=None)
def versions_for(name: str, python: str) -> tuple[str, ...] | str:
    """Versions pip finds for ``python`` on the images' platform (the index's
    Requires-Python and the wheels' tags applied by pip; a release that has a
    source distribution counts too), or pip's error."""
    # pip does not widen a manylinux platform to older glibc versions: name them all
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(17, IMAGE_GLIBC[1] + 1)]
    platforms += ["manylinux2014_x86_64", "linux_x86_64"]
    cmd = [sys.executable, "-m", "pip", "index", "versions", name, "--python-version", python,
           "--implementation", "cp", "--disable-pip-version-check", *[a for p in platforms for a in ("--platform", p)]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r"^Available versions: (.*)$", out.stdout, re.M)
    if m:
        return tuple(v.strip() for v in m.group(1).split(","))
    if "No matching distribution" in out.stderr + out.stdout:
        return ()
    return (out.stderr.strip().splitlines() or [f"pip exited {out.returncode}"])[-1]


def pin_mismatches(path: Path, only: tuple[str, ...] = (), target: str = "cpu") -> list[str]:
    python = image_python(path, target)
    pins = {k: v for k, v in image_pins(path).items() if not only or k in only}
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = dict(zip(pins, pool.map(lambda n: versions_for(n, python), pins)))
    bad = []
    for name, version in sorted(pins.items()):
        got = found[name]
        if isinstance(got, str):
            bad.append(f"{name}=={version}: pip could not list it ({got})")
        elif version not in got:
            bad.append(f"{name}=={version}: no release for Python {python} "
                       f"(pip finds {', '.join(got[:3]) or 'none'}{' ...' if len(got) > 3 else ''})")
    return bad


@pytest.mark.slow  # ~18 s per image (one `pip index` per pin): make test-all; the mismatch check below stays
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_every_pinned_package_supports_the_image_python(target: str) -> None:
    path = dockerfile_path()
    bad = pin_mismatches(path, target=target)
    assert not bad, f"{path} (Python {image_python(path, target)}):\n  " + "\n  ".join(bad)


def test_a_python_pin_mismatch_is_caught(tmp_path: Path) -> None:
    """Python 3.10 (the NGC 24.10 image's own) cannot install the pins (scipy 1.17 needs >= 3.11)."""
    copy = tmp_path / "Dockerfile"
    copy.write_text(re.sub(r"^ARG FACETRON_PYTHON=.*$", "ARG FACETRON_PYTHON=3.10",
                           (DEPLOY / "Dockerfile").read_text(), flags=re.M))
    bad = pin_mismatches(copy, only=("scipy", "numpy", "torch", "gradio"))  # a few: each pip call costs ~1 s
    assert any(b.startswith("scipy==") for b in bad), bad
