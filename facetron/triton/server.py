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
import fcntl
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

from facetron.contract import MERGED_UNET_PREFIX
from facetron import contract
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
#: ``facetron-<boot id>-<random>-``: the python-backend regions of one server (and its lock file)
SHM_PREFIX_RE = re.compile(r"facetron-([0-9a-f]{8})-([0-9a-f]{8})-")
#: the names of launchers before the boot id (``facetron-<launcher pid>-<random>-``): judged by PID
LEGACY_SHM_PREFIX_RE = re.compile(r"facetron-(\d{1,7})-([0-9a-f]{8})-")
#: ``<prefix>lock``: held (flock) by the launcher and inherited by tritonserver while the regions are in use
SHM_LOCK_SUFFIX = "lock"

#: The admin key's header names (one definition, in the contract: the client sends them too)
ADMIN_HEADER, GRPC_ADMIN_HEADER = contract.ADMIN_HEADER, contract.GRPC_ADMIN_HEADER
#: every protocol besides health, metadata and inference: behind the admin key in every launch mode
RESTRICTED_APIS = ("shared-memory", "model-repository", "model-config", "statistics", "trace", "logging")
ADMIN_KEY_ENV = contract.ADMIN_KEY_ENV
USER_TOKEN_HEADER, USER_TOKENS_ENV = contract.USER_TOKEN_HEADER, contract.USER_TOKENS_ENV
MERGED_LEDGER_ENV = contract.MERGED_LEDGER_ENV


def restricted_args(key: str) -> list[str]:
    """tritonserver flags that put :data:`RESTRICTED_APIS` behind ``key`` over gRPC and HTTP."""
    if not key or not re.fullmatch(r"[A-Za-z0-9_.~+/-]{16,}", key):
        raise ServerError("admin key: at least 16 characters of letters, digits and _.~+/- (no ',', ':', '=' or spaces)")
    spec = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={key}"
    return [f"--grpc-restricted-protocol={spec}", f"--http-restricted-api={spec}"]


def base_models(repo: Path) -> list[str]:
    """The repository's models except merged users' ``unet_user_<id>`` (those load on first use)."""
    return [m for m in check_repository(repo) if not m.startswith(MERGED_UNET_PREFIX)]


def boot_id() -> str:
    """8 hex digits of this kernel boot's id (regions of an earlier boot are orphans)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8].lower()
    except OSError:  # pragma: no cover - not Linux
        return "00000000"


def new_shm_prefix() -> str:
    """``facetron-<boot id>-<random>-``. Whether its owner lives is told by the lock file
    ``<prefix>lock`` (:func:`hold_shm_lock`), not by a PID: in a container the launcher is
    PID 1 in every life, and a restarted container sees the old one's /dev/shm."""
    return f"facetron-{boot_id()}-{secrets.token_hex(4)}-"


def hold_shm_lock(prefix: str) -> int:
    """Create ``<prefix>lock`` in /dev/shm, locked (flock), and return its descriptor. The lock
    lasts while any process holding the descriptor lives (the launcher, and tritonserver,
    which inherits it). Locked before it gets its name, so no one sees it unlocked."""
    SHM_DIR.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{prefix}", dir=SHM_DIR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(tmp, SHM_DIR / f"{prefix}{SHM_LOCK_SUFFIX}")
    return fd


def regions(prefix: str = "facetron-") -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*")) if SHM_DIR.is_dir() else []


def remove_regions(prefix: str) -> list[Path]:
    """Remove this server's python-backend shared-memory regions (after it stopped), its lock file last."""
    gone = []
    lock = SHM_DIR / f"{prefix}{SHM_LOCK_SUFFIX}"
    for path in [p for p in regions(prefix) if p != lock] + [lock]:
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


def _owner_gone(prefix: str, boot: str) -> int | None:
    """A descriptor holding ``prefix``'s lock when its owner is gone (close it after removing), else None.
    Regions of another boot are orphans; without a lock file (a server between removing its regions
    and its lock) nothing is judged."""
    lock = SHM_DIR / f"{prefix}{SHM_LOCK_SUFFIX}"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return os.open(os.devnull, os.O_RDONLY) if not prefix.startswith(f"facetron-{boot}-") else None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its server lives
        os.close(fd)
        return None
    return fd


def remove_orphaned_regions() -> list[Path]:
    """Regions whose server is gone (SIGKILLed, or a container restarted over the same /dev/shm):
    the lock file of their prefix is free, or they are of an earlier boot. Names of older
    launchers (``facetron-<pid>-...``) are judged by that PID."""
    gone: list[Path] = []
    boot = boot_id()
    for prefix in sorted({m.group(0) for p in regions() if (m := SHM_PREFIX_RE.match(p.name))}):
        fd = _owner_gone(prefix, boot)
        if fd is not None:
            try:
                gone += remove_regions(prefix)
            finally:
                os.close(fd)
    for path in regions():
        m = LEGACY_SHM_PREFIX_RE.match(path.name)
        if m and path.exists() and not _alive(int(m.group(1))):
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
    startup_timeout_s: float = 300.0  # a loaded 2-core machine has taken > 120 s to load the tiny repository
    #: python-backend shared-memory regions of this server are /dev/shm/<shm_prefix>*
    shm_prefix: str = field(default_factory=lambda: new_shm_prefix())
    #: every non-inference API (:data:`RESTRICTED_APIS`) needs this key, in every model-control mode
    #: $FACETRON_ADMIN_KEY when set (one key for a deployment, its clients and tests), else a fresh random one
    admin_key: str = field(default_factory=lambda: os.environ.get(ADMIN_KEY_ENV) or secrets.token_hex(16), repr=False)
    #: served models open a user only with its per-user token (facetron.users); False = single-user local use
    user_tokens: bool = True
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _shm_lock: int | None = field(default=None, init=False, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def command(self, install: TritonInstall, backend_dir: Path) -> list[str]:
        return self.argv(install.binary, backend_dir)

    def argv(self, binary: Path | str, backend_dir: Path) -> list[str]:
        """The tritonserver command line (any tritonserver binary: the wheel's, or NGC's in the gpu image)."""
        cmd = [
            str(binary),
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
        # shared memory, repository, config, statistics, trace, logging: only with the key, in
        # every mode (python models' BLS load_model is in-process and unaffected)
        cmd += restricted_args(self.admin_key)
        # the caller's per-user token reaches the models as a request parameter (facetron.users)
        cmd += [f"--grpc-header-forward-pattern={USER_TOKEN_HEADER}", f"--http-header-forward-pattern={USER_TOKEN_HEADER}"]
        cmd += [f"--load-model={m}" for m in self.load_models]
        return cmd + list(self.extra_args)

    @property
    def merged_ledger(self) -> Path:
        """Merged mode's server-wide LRU (facetron.triton.bls.MergedModels): beside this server's
        shared-memory regions, so it goes when they go (also after a SIGKILL, at the next start)."""
        return SHM_DIR / f"{self.shm_prefix}merged-lru.json"

    @property
    def admin_headers(self) -> dict[str, str]:
        """gRPC metadata for the restricted APIs (:data:`RESTRICTED_APIS`)."""
        return {GRPC_ADMIN_HEADER: self.admin_key}

    @property
    def http_admin_headers(self) -> dict[str, str]:
        """HTTP headers for the restricted APIs: the header is ``ADMIN_HEADER`` itself."""
        return {ADMIN_HEADER: self.admin_key}

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env[USER_TOKENS_ENV] = "on" if self.user_tokens else "off"  # set either way: only the launcher decides
        env[MERGED_LEDGER_ENV] = str(self.merged_ledger)
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
        self._check_bind()
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
        command = self.command(install, backend_dir)  # checks the admin key before anything is made
        self._shm_lock = hold_shm_lock(self.shm_prefix)
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(install),
                preexec_fn=_set_pdeathsig,
                pass_fds=(self._shm_lock,),  # the regions' lock lives while the server does
            )
        except BaseException:
            self._release_shm()
            raise
        finally:
            log.close()
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_bind(self) -> None:
        if self.host != LOOPBACK and not os.environ.get("FACETRON_ALLOW_PUBLIC_BIND"):
            raise ServerError(
                f"refusing to bind {self.host}: facetron serves on {LOOPBACK} unless "
                "FACETRON_ALLOW_PUBLIC_BIND=1 is set"
            )

    def exec(self, binary: Path | str, backend_dir: Path) -> None:
        """Containers: become ``binary`` (e.g. NGC's tritonserver, PID 1) with :meth:`argv`'s flags.
        Orphaned regions are removed first; the new prefix's lock is inherited by the server, so
        the next container's start sees it free once this one is gone. Ports must be given."""
        if None in (self.grpc_port, self.http_port, self.metrics_port):
            raise ServerError("exec: give --grpc-port, --http-port and --metrics-port")
        self._check_bind()
        command = self.argv(binary, backend_dir)
        remove_orphaned_regions()
        lock = hold_shm_lock(self.shm_prefix)
        os.set_inheritable(lock, True)
        os.environ[USER_TOKENS_ENV] = "on" if self.user_tokens else "off"  # as _environment does
        os.environ[MERGED_LEDGER_ENV] = str(self.merged_ledger)
        os.execv(command[0], command)

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
            self._release_shm()
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
        self._release_shm()
        self.process = None
        _LIVE.discard(self)

    def _release_shm(self) -> None:
        """Remove this server's regions and lock file (after it stopped), then drop the lock."""
        if self._shm_lock is None:
            return
        remove_regions(self.shm_prefix)
        os.close(self._shm_lock)
        self._shm_lock = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
