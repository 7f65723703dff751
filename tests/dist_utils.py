"""Launch small torchrun jobs from tests (CPU, gloo)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child job: muvla from src/, tests/ importable, one thread, no GPU, quiet bars."""
    env = dict(os.environ)
    paths = [str(REPO / "src"), str(REPO / "tests")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update({"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                "MUVLA_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def torchrun_cmd(script: Path, nproc: int, args: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *(args or [])]


def start_torchrun(script: Path, nproc: int, args: list[str] | None = None, env: dict[str, str] | None = None,
                   log: Path | None = None) -> subprocess.Popen:
    """Start a job in its own process group (so ``kill_group`` stops the launcher and all workers)."""
    cmd = torchrun_cmd(script, nproc, args)
    if log is None:
        return subprocess.Popen(cmd, env=torchrun_env(env), cwd=str(REPO), stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=torchrun_env(env), cwd=str(REPO), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run_torchrun(script: Path, nproc: int, args: list[str] | None = None, env: dict[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a job to completion; raise with its output if it fails."""
    proc = subprocess.run(torchrun_cmd(script, nproc, args), env=torchrun_env(env), cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the job's whole process group (launcher and workers), like a lost node."""
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def run_ranks(script: Path, nproc: int, args: list[str] | None = None, env: dict[str, str] | None = None,
              timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Start ``nproc`` plain processes with torchrun's environment (RANK, WORLD_SIZE, MASTER_*).

    Cheaper than torchrun for quick tests (no launcher process importing torch); use
    ``start_torchrun`` / ``run_torchrun`` when the real launcher matters.
    """
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    **(env or {})}
        procs.append(subprocess.Popen([sys.executable, str(script), *(args or [])], env=torchrun_env(rank_env),
                                      cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    done = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(r, d) for r, d in enumerate(done) if d.returncode != 0]
    if failed:
        raise RuntimeError("\n".join(f"rank {r} failed ({d.returncode}):\n{d.stdout[-3000:]}" for r, d in failed))
    return done
