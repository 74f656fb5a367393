"""Locating and running the real `tritonserver` on a model repository.

The server comes from the PyPI package nvidia-pytriton (which ships tritonserver with the
Python backend and one backend stub per Python version) or from a tritonserver on PATH.
The Python backend runs each model instance in a stub process that embeds Python; it finds
its environment the way a `python3` on PATH would, so the server gets a PATH whose first
`python3` is a small overlay environment of this interpreter with this environment's
packages. The pytriton stub is built with a pybind11 that reads NumPy 1.x array
descriptors, so when this environment has NumPy 2 the overlay puts a NumPy 1.x site
directory (STUB_SITE, installed once with pip) in front; torch and our code run on either.
Everything the server needs besides the repository lives in a private work directory
removed at stop; nothing is written into site-packages.

When a stub process dies (killed, out of memory, a crash in native code), Triton's Python
backend (as shipped in nvidia-pytriton 0.7.0) does not restart it, never ends the requests it
was streaming (their clients wait forever) and keeps reporting the model ready while every new
request fails with "Stub process ... is not healthy". So `dead_stub` watches the stubs, and
`redrafter serve` restarts the whole server when one dies (serving/cli.py).

The server has no authentication: it binds 127.0.0.1 unless told otherwise, and `exposed`
says when an address reaches beyond this machine.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
STUB_SITE = Path(sys.prefix) / "triton-stub-site"


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path  # the backend directory as installed (python/ inside)
    stub: Path | None  # the Python backend stub for this Python to add; None: backends/python has one
    lib_dirs: tuple[Path, ...]  # shared libraries the binary and the stub load


def find_tritonserver() -> TritonInstall:
    """nvidia-pytriton's server if installed, else a tritonserver on PATH."""
    spec = find_spec("pytriton")  # locates the package without importing it (or its dependencies)
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            stub = root / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub"
            if not stub.is_file():
                raise FileNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {PY_VERSION} "
                                        f"(looked for {stub}): use a Python it supports (3.8-3.13)")
            return TritonInstall(root / "bin" / "tritonserver", root / "backends", stub,
                                 (root.parent.parent / "nvidia_pytriton.libs",))
    found = shutil.which("tritonserver")
    if found:
        binary = Path(found).resolve()
        return TritonInstall(binary, binary.parent.parent / "backends", None, ())
    raise FileNotFoundError("tritonserver not found: install it with `pip install --no-deps nvidia-pytriton` "
                            "(the package ships the server) or put a tritonserver on PATH")


def _numpy_major() -> int:
    try:
        return int(version("numpy").split(".")[0])
    except PackageNotFoundError:
        raise FileNotFoundError("numpy is not installed: the Triton Python backend needs it") from None


def stub_environment(root: Path, numpy1: bool = True) -> Path:
    """An overlay virtual environment at `root` for the backend stub (see the module doc);
    numpy1: the stub needs NumPy 1.x (pytriton's does)."""
    site_packages = root / "lib" / f"python{PY_VERSION}" / "site-packages"
    site_packages.mkdir(parents=True)
    (root / "bin").mkdir()
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    (root / "bin" / "python3").symlink_to(base)
    (root / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                     f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
    if numpy1 and _numpy_major() >= 2:
        if not any(STUB_SITE.glob("numpy-1.*.dist-info")):
            raise FileNotFoundError(f"the Triton Python backend stub needs NumPy 1.x but this environment has "
                                    f"NumPy 2 and {STUB_SITE} holds no NumPy 1.x: run "
                                    f"`{sys.executable} -m pip install --target {STUB_SITE} 'numpy<2'`")
        (site_packages / "00-numpy1.pth").write_text(f"{STUB_SITE}\n")  # .pth files load in name order
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (site_packages / "10-redrafter-env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in ours) + "\n")
    return root


def backend_directory(install: TritonInstall, root: Path) -> Path:
    """The backends to load: pytriton's Python backend plus the stub for this Python."""
    if install.stub is None:
        return install.backends
    python = root / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(install.backends / "python" / name, python / name)
    shutil.copy2(install.stub, python / "triton_python_backend_stub")
    return root


class TritonServer:
    """A tritonserver process on `repository`, bound to `host` (loopback by default).

    `log` is a file for the server's output (None: inherit this process's stdout/stderr).
    `threads` > 0 sets OMP_NUM_THREADS for the model instances (torch's CPU threads each).
    Use as a context manager, or call start() and stop().
    """

    def __init__(self, repository: str | os.PathLike, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, log: str | os.PathLike | None = None,
                 exit_timeout_s: int = 10, threads: int = 0):
        self.repository = Path(repository).resolve()
        if not (self.repository.is_dir() and any(self.repository.glob("*/config.pbtxt"))):
            raise FileNotFoundError(f"{str(self.repository)!r} is not a Triton model repository "
                                    "(no <model>/config.pbtxt): write one with `redrafter triton-repo`")
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log = Path(log) if log is not None else None
        self.exit_timeout_s = exit_timeout_s
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.stubs: tuple[int, ...] = ()  # the model instances' stub processes, found once ready
        self._workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        return [str(install.binary), "--model-repository", str(self.repository), "--backend-directory",
                str(backends), "--disable-auto-complete-config", "--exit-timeout-secs", str(self.exit_timeout_s),
                "--http-address", self.host, "--http-port", str(self.http_port),
                "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
                "--metrics-address", self.host, "--metrics-port", str(self.metrics_port)]

    def start(self, ready_timeout_s: float = 300.0) -> "TritonServer":
        if self.proc is not None:
            raise RuntimeError("this server is already started")
        install = find_tritonserver()
        self._workdir = Path(tempfile.mkdtemp(prefix="redrafter-triton-"))
        try:
            python = stub_environment(self._workdir / "python", numpy1=install.stub is not None)
            backends = backend_directory(install, self._workdir / "backends")
            env = dict(os.environ)
            libs = [*map(str, install.lib_dirs), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
            env["PATH"] = f"{python / 'bin'}{os.pathsep}{env.get('PATH', '')}"
            if self.threads:
                env["OMP_NUM_THREADS"] = str(self.threads)
            out = open(self.log, "ab") if self.log is not None else None
            try:
                # Its own process group: stop() can reach the stub processes too.
                self.proc = subprocess.Popen(self.command(install, backends), env=env, stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=subprocess.STDOUT if out else None,
                                             start_new_session=True)
            finally:
                if out is not None:
                    out.close()
            self.wait_ready(ready_timeout_s)
            self.stubs = tuple(stub_processes(self.proc.pid))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Poll the readiness endpoint until every model is loaded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with status {self.proc.returncode} before it was "
                                   f"ready{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver was not ready after {timeout_s:.0f} s{self._log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def dead_stub(self) -> tuple[int, str] | None:
        """(pid, how it ended) of a model instance's stub process that has died, else None."""
        for pid in self.stubs:
            ended = _ended(pid)
            if ended is not None:
                return pid, ended
        return None

    def stop(self, timeout_s: float = 30.0, graceful: bool = True) -> None:
        """Graceful shutdown (SIGTERM lets in-flight requests finish for exit_timeout_s), then
        SIGKILL to the whole process group so no stub process outlives the server.
        graceful=False: SIGKILL at once (requests that can never finish would only delay it)."""
        proc, self.proc, self.stubs = self.proc, None, ()
        if proc is not None:
            if graceful and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log_tail(self, chars: int = 4000) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        return f"; server log ({self.log}) ends with:\n{self.log.read_text(errors='replace')[-chars:]}"


def stub_processes(server_pid: int) -> list[int]:
    """The Python backend stub processes the server started (its children)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid and cmd.endswith(b"triton_python_backend_stub"):
            found.append(int(entry))
    return sorted(found)


def _ended(pid: int) -> str | None:
    """How a process ended, if it has: gone, or a zombie whose exit status its parent (the
    server, which does not reap its stubs) has not collected (/proc/PID/stat field 52)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "exited"
    if fields[0] not in ("Z", "X"):
        return None
    status = int(fields[49]) if len(fields) > 49 else 0
    if os.WIFSIGNALED(status):
        try:
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        except ValueError:
            return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def exposed(host: str) -> bool:
    """Whether binding `host` makes the server reachable from other machines."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to, assume it is reachable
        return True


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
