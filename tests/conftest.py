"""Shared fixtures: run the real CLI in a process of its own (forked from a server that has the heavy
imports done: tests/cli_server.py, docs/architecture.md "Tests"), with runs under a temp dir."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tiny networks on 2 cores run fastest single-threaded; several processes would otherwise
# oversubscribe the cores (DDP tests run two).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> CliResult:
    """`python -m distillkit.cli ARGS` (the `distill` command), its exit status and output."""
    return run_module("distillkit.cli", *args, cwd=cwd, env=env, timeout=timeout)


def run_module(module: str, *args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: int = 600) -> CliResult:
    """`python -m MODULE ARGS` in REPO (or cwd) with os.environ plus env: forked from this worker's
    fork server (tests/cli_server.py), which has the heavy imports done, or a fresh interpreter with
    DISTILLKIT_TEST_FRESH=1."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("HYDRA_FULL_ERROR", None)
    if env:
        e.update(env)
    cwd = Path(cwd or REPO)
    # settings torch, inductor and Hugging Face read when imported: the fork server imported them already
    read_at_import = any(k.startswith(IMPORT_TIME_ENV) for k in (env or {}))
    if read_at_import or os.environ.get("DISTILLKIT_TEST_FRESH") == "1":
        p = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=e, capture_output=True, text=True,
                           timeout=timeout)
        return CliResult(p.returncode, p.stdout, p.stderr)
    return _FORK_SERVER.run(module, list(args), cwd, e, timeout)


IMPORT_TIME_ENV = ("TORCH", "CXX", "CC", "HF_", "TRANSFORMERS_", "DIFFUSERS_")


class _ForkServer:
    """This process's tests/cli_server.py, started at the first run and stopped at exit."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.dir = None

    def _socket(self) -> str:
        with self.lock:
            if self.proc is None:
                self.dir = tempfile.mkdtemp(prefix="dk-fork-")
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                env.setdefault("OMP_NUM_THREADS", "1")
                with open(os.path.join(self.dir, "server.log"), "w") as log:  # the server holds its own copy
                    self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_server.py"), self.path],
                                                 cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT)
                atexit.register(self.stop)
                deadline = time.time() + 300
                while not os.path.exists(self.path):
                    if self.proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError("the tests' fork server did not start: "
                                           + Path(self.dir, "server.log").read_text())
                    time.sleep(0.05)
            return self.path

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "s")

    def stop(self):
        if self.proc is not None:
            shutil.rmtree(self.dir, ignore_errors=True)  # the server stops once its socket file is gone
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, module: str, args: list, cwd: Path, env: dict, timeout: int) -> CliResult:
        path = self._socket()
        with tempfile.TemporaryDirectory(prefix="dk-run-") as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            request = {"module": module, "args": args, "cwd": str(cwd), "env": env, "out": out, "err": err}
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(path)
                conn.sendall(json.dumps(request).encode() + b"\n")
                conn.settimeout(timeout)
                reader = conn.makefile("rb")
                pid = json.loads(reader.readline())["pid"]
                try:
                    line = reader.readline()
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired([module, *args], timeout) from None
                rc = json.loads(line)["rc"]
            return CliResult(rc, Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))


_FORK_SERVER = _ForkServer()


def run_cli_all(jobs: dict) -> dict:
    """Several CLI runs at once (each is mostly single-threaded imports), each asserted to succeed:
    name -> arguments in, name -> CliResult out."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = dict(zip(jobs, pool.map(lambda args: run_cli(*args), jobs.values())))
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.output}"
    return results


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def digits_teacher_ckpt(tmp_path_factory) -> Path:
    """A real (short) digits teacher run through the CLI; its last.ckpt."""
    runs = tmp_path_factory.mktemp("teacher_runs")
    r = run_cli("experiment=digits_teacher", f"runs_dir={runs}", "trainer.max_epochs=3",
                "callbacks.progress=none")
    assert r.returncode == 0, r.output
    ckpt = runs / "digits_teacher" / "default" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory) -> Path:
    """A randomly initialised mlp2d denoiser's weights: a teacher for toy2d step-distillation runs."""
    from distillkit.models.mlp import MLPDenoiser

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("toy_teacher") / "mlp2d.pt"
    torch.save(MLPDenoiser().state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------------
# The suite's budget is 15 minutes on 2 cores (docs/architecture.md, "Tests"): after pytest's 15 slowest tests,
# the 15 slowest files (setup, call and teardown summed over their tests, module fixtures included), so
# growth shows where it happens.
_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _FILE_SECONDS or hasattr(terminalreporter.config, "workerinput"):
        return
    terminalreporter.write_sep("=", "slowest 15 test files")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:15]:
        terminalreporter.write_line(f"{seconds:8.1f}s {path}")
    terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f}s in all test files (summed over workers)")
