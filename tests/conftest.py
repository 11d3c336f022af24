"""Shared fixtures: run the real CLI in a subprocess, with runs under a temp dir."""
from __future__ import annotations

import os
import subprocess
import sys
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
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("HYDRA_FULL_ERROR", None)
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, "-m", "distillkit.cli", *args], cwd=cwd or REPO, env=e,
                       capture_output=True, text=True, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr)


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
