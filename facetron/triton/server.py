"""Start and stop a real ``tritonserver`` on loopback, without a container.

The ``nvidia-pytriton`` wheel ships a ``tritonserver`` binary, its shared
libraries and the python backend. This module finds them, assembles the
backend folder Triton expects (``python/`` with the backend library, its
utils module and the stub built for this Python), starts the server on
127.0.0.1 with free ports, waits until it is ready, streams its log to a
file, and stops it — also when the calling process dies (the child gets
``PR_SET_PDEATHSIG``).

Errors name their cause: binary missing, port taken, repository missing or
malformed, model failed to load (with the model's own error line).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from facetron.errors import ServerError
from facetron.paths import cache_dir

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TritonInstall:
    """Paths of the tritonserver shipped in the nvidia-pytriton wheel."""

    binary: Path
    lib_dir: Path
    python_backend_dir: Path
    stub: Path
    version: str


def _site_packages() -> list[Path]:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    paths.update(p for p in sys.path if p.endswith("site-packages"))
    return [Path(p) for p in paths if Path(p).is_dir()]


def find_triton() -> TritonInstall:
    """Locate tritonserver + python backend inside the installed nvidia-pytriton."""
    override = os.environ.get("FACETRON_TRITONSERVER")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    for sp in _site_packages():
        root = sp / "pytriton" / "tritonserver"
        binary = Path(override) if override else root / "bin" / "tritonserver"
        if not (root.is_dir() and binary.is_file()):
            continue
        lib_dir = sp / "nvidia_pytriton.libs"
        backend = root / "backends" / "python"
        stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"tritonserver: no python backend stub for Python {py} at {stub}")
        if not (backend / "libtriton_python.so").is_file():
            raise ServerError(f"tritonserver: python backend library missing in {backend}")
        version = "unknown"
        try:
            from importlib.metadata import version as _v

            version = _v("nvidia-pytriton")
        except Exception:  # pragma: no cover
            pass
        return TritonInstall(binary, lib_dir, backend, stub, version)
    raise ServerError(
        "tritonserver binary not found: install the nvidia-pytriton wheel "
        "(`make setup`) or set FACETRON_TRITONSERVER to a tritonserver binary"
    )


def prepare_backend_dir(install: TritonInstall, dest: Path | None = None) -> Path:
    """Assemble ``<dest>/python/`` (backend .so, utils, stub) and return ``dest``.

    Triton looks up the stub next to ``libtriton_python.so``; the wheel keeps
    them apart, so they are copied into one folder (once per version)."""
    if dest is None:

        py = f"{sys.version_info.major}{sys.version_info.minor}"
        dest = cache_dir("triton-backends", f"pytriton-{install.version}-py{py}")
    pydir = dest / "python"
    stub_dst = pydir / "triton_python_backend_stub"
    if stub_dst.is_file() and (pydir / "libtriton_python.so").is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=".python.", dir=dest))
    shutil.copy2(install.python_backend_dir / "libtriton_python.so", tmp)
    shutil.copy2(install.python_backend_dir / "triton_python_backend_utils.py", tmp)
    shutil.copy2(install.stub, tmp / "triton_python_backend_stub")
    os.chmod(tmp / "triton_python_backend_stub", 0o755)
    try:
        os.replace(tmp, pydir)
    except OSError:  # another process won the race: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_repository(repo: Path) -> list[str]:
    """Validate a model repository before starting: exists, has models, and
    every ``config.pbtxt`` parses as Triton's ModelConfig. Returns model names."""
    repo = Path(repo)
    if not repo.exists():
        raise ServerError(f"model repository {repo} does not exist")
    if not repo.is_dir():
        raise ServerError(f"model repository {repo} is not a folder")
    models = sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        raise ServerError(f"model repository {repo} holds no model folders")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for name in models:
        cfg = repo / name / "config.pbtxt"
        if not cfg.is_file():
            raise ServerError(f"model {name!r}: {cfg} is missing")
        try:
            text_format.Parse(cfg.read_text(), model_config_pb2.ModelConfig())
        except text_format.ParseError as exc:
            raise ServerError(f"model {name!r}: {cfg} is malformed: {exc}") from None
    return models


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setsid()


_LOAD_ERROR = re.compile(r"failed to load '([^']+)' version \d+: (.*)")
_POLL_ERROR = re.compile(r"Poll failed for model directory '([^']+)': (.*)")
_BIND_ERROR = re.compile(r"(?i)(address already in use|failed to (start|bind)[^\n]*)")


def explain_log(text: str) -> str | None:
    """The most useful error line of a server log, as one sentence."""
    m = _LOAD_ERROR.search(text)
    if m:
        return f"model {m.group(1)!r} failed to load: {m.group(2).strip()}"
    m = _POLL_ERROR.search(text)
    if m:
        return f"model {m.group(1)!r} is invalid: {m.group(2).strip()}"
    m = _BIND_ERROR.search(text)
    if m:
        line = next((ln for ln in text.splitlines() if m.group(0) in ln), m.group(0))
        return f"server could not bind its ports: {line.strip()}"
    for line in reversed(text.splitlines()):
        if line.startswith("E") or "error" in line.lower():
            return line.strip()
    return None


_LIVE: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()

SHM_DIR = Path("/dev/shm")
SHM_PREFIX_RE = re.compile(r"facetron-(\d+)-[0-9a-f]{8}-")
ADMIN_HEADER = "facetron-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # Triton prefixes restricted gRPC headers


def new_shm_prefix() -> str:
    """``facetron-<launcher pid>-<random>-``: regions of a launcher that died are orphans."""
    return f"facetron-{os.getpid()}-{secrets.token_hex(4)}-"


def regions(prefix: str = "facetron-") -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*")) if SHM_DIR.is_dir() else []


def remove_regions(prefix: str) -> list[Path]:
    """Remove this server's python-backend shared-memory regions (after it stopped)."""
    gone = []
    for path in regions(prefix):
        try:
            path.unlink()
            gone.append(path)
        except OSError:
            pass
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphaned_regions() -> list[Path]:
    """Regions left by servers whose launcher process is gone (e.g. SIGKILLed)."""
    gone = []
    for path in regions():
        m = SHM_PREFIX_RE.match(path.name)
        if m and not _alive(int(m.group(1))):
            gone += remove_regions(m.group(0))
    return gone


def _wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    """Poll until no process of the group is left (the stubs exit after the server)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


@dataclass(eq=False)
class TritonServer:
    """A real tritonserver process on loopback.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    Ports left as ``None`` are picked free at start.
    """

    model_repository: Path
    grpc_port: int | None = None
    http_port: int | None = None
    metrics_port: int | None = None
    host: str = LOOPBACK
    model_control_mode: str = "none"  # "none" | "explicit" | "poll"
    load_models: Sequence[str] = ()
    log_path: Path | None = None
    log_verbose: int = 0
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 120.0
    #: python-backend shared-memory regions of this server are /dev/shm/<shm_prefix>*
    shm_prefix: str = field(default_factory=lambda: new_shm_prefix())
    #: explicit model control: the repository and shared-memory APIs need this header
    admin_key: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def command(self, install: TritonInstall, backend_dir: Path) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control_mode}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            "--exit-timeout-secs=10",
        ]
        cmd += [f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        if self.model_control_mode == "explicit":
            # load/unload and shared-memory registration only for callers with the key
            # (python models' BLS load_model is in-process and unaffected)
            restricted = f"model-repository,shared-memory:{ADMIN_HEADER}={self.admin_key}"
            cmd += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
        cmd += [f"--load-model={m}" for m in self.load_models]
        return cmd + list(self.extra_args)

    @property
    def admin_headers(self) -> dict[str, str]:
        """gRPC metadata for the restricted APIs (explicit model control); over
        HTTP the header is ``ADMIN_HEADER`` itself."""
        return {GRPC_ADMIN_HEADER: self.admin_key}

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        # The python backend stub embeds the first python3 on PATH: make it
        # this interpreter's (the venv's), or models cannot import numpy.
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        libs = [str(install.lib_dir)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
        # The stub links libpython3.X.so dynamically; the first one found must be
        # this interpreter's, or its stdlib extensions (ssl, ...) fail to load
        # against another patch release (Debian's 3.11.2 vs pyenv's 3.11.7: seen here).
        libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
        if libdir and ldlib and (Path(libdir) / ldlib).exists():
            libs.insert(0, libdir)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            return self
        remove_orphaned_regions()
        self.model_repository = Path(self.model_repository).resolve()
        if self.model_control_mode != "explicit" or self.load_models:
            check_repository(self.model_repository)
        elif not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist")
        if self.host != LOOPBACK and not os.environ.get("FACETRON_ALLOW_PUBLIC_BIND"):
            raise ServerError(
                f"refusing to bind {self.host}: facetron serves on {LOOPBACK} unless "
                "FACETRON_ALLOW_PUBLIC_BIND=1 is set"
            )
        for label in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, label)
            if port is None:
                setattr(self, label, free_port(self.host))
            elif not port_is_free(port, self.host):
                raise ServerError(f"port {port} ({label.split('_')[0]}) on {self.host} is already in use")
        install = find_triton()
        backend_dir = prepare_backend_dir(install)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path = Path(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command(install, backend_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(install),
                preexec_fn=_set_pdeathsig,
            )
        finally:
            log.close()
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                reason = explain_log(self.log_text()) or f"exited with code {code}"
                raise ServerError(f"tritonserver stopped during start: {reason} (log: {self.log_path})")
            if self._ready():
                return
            time.sleep(0.2)
        reason = explain_log(self.log_text())
        raise ServerError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f} s"
            + (f": {reason}" if reason else "")
            + f" (log: {self.log_path})"
        )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL the whole process group."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        # stubs of the python backend live in the same process group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _wait_group_gone(proc.pid)
        remove_regions(self.shm_prefix)
        self.process = None
        _LIVE.discard(self)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
