"""A fork server for the tests' CLI runs: one process per pytest worker imports torch, Lightning,
torchmetrics, diffusers and distillkit once (about 11 s on the 2-core machine), then forks a child for
each `python -m distillkit.<module> ARGS` the tests ask for. The child sets the requested working
directory, environment and argv, sends its stdout and stderr to files, and runs the module as
``__main__`` exactly as ``python -m`` does, so a run sees what a fresh process sees less the import
time. The server itself never runs a torch operation or starts a thread, so the fork is clean.

    python tests/cli_server.py SOCKET_PATH     # serves until the socket's file is removed or its parent exits

One JSON line per connection: {"module", "args", "cwd", "env", "out", "err"}. The child answers
{"pid": N} at once and {"rc": N} when the module has finished (the exit status a process would have
had: SystemExit's code, 1 after an uncaught exception, minus the signal that killed it). Each request
forks a waiter, which forks the runner and reports its pid and exit status. ``DISTILLKIT_TEST_FRESH=1``
makes the tests start a fresh interpreter for every run instead, as they do for a run whose
environment sets what torch or Hugging Face read at import (conftest.run_module).
"""
from __future__ import annotations

import json
import os
import select
import socket
import sys


def _warm() -> None:
    import lightning.pytorch  # noqa: F401  (lightning imports torchmetrics, which imports transformers)
    import torch  # noqa: F401

    import distillkit.cli  # noqa: F401
    try:  # the Stable Diffusion tests' runs
        import diffusers  # noqa: F401
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    except ImportError:
        pass


def _run(request: dict) -> None:
    """In the forked runner: become `python -m <module> <args>` and exit as it would."""
    import atexit
    import runpy
    import threading
    import traceback

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["out"]), (2, request["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["-m", *request["args"]]  # run_module puts the module's file in argv[0], as -m does
    sys.path.insert(0, request["cwd"])  # as -m does; the tests' folder stays behind it (cli_with_events)
    if "OMP_NUM_THREADS" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # as under `python -m`, the module runs as __main__ only (the warm-up imported it as itself)
    sys.modules.pop(request["module"], None)
    rc = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            rc = 0
        elif isinstance(e.code, int):
            rc = e.code
        else:
            print(e.code, file=sys.stderr)
            rc = 1
    except BaseException:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        rc = 1
    # The interpreter's own shutdown, in its order: threading's exit hooks (which stop executors'
    # workers, e.g. inductor's compile pool) and the join of non-daemon threads, then the exit handlers
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(rc)


def _child(conn: socket.socket, request: dict) -> None:
    """In the forked waiter: fork the runner, report its pid, wait for it and report its exit status
    as subprocess does (the code it exited with, or minus the signal that ended it)."""
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        conn.sendall(json.dumps({"rc": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
    finally:
        os._exit(0)


def _read_request(conn: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data)


def serve(path: str) -> None:
    _warm()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # the client waits for the path: it appears once the server listens
    server.listen(64)
    parent = os.getppid()
    while os.path.exists(path) and os.getppid() == parent:  # the pytest worker is gone: stop
        while True:  # reap finished children
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        ready, _, _ = select.select([server], [], [], 1.0)
        if not ready:
            continue
        conn, _ = server.accept()
        request = _read_request(conn)
        if os.fork() == 0:
            server.close()
            _child(conn, request)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
