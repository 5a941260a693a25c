"""`rlhf <words>` in a process of its own, forked from a server that has already imported the heavy libraries.

The pipeline runs each stage in a process of its own: stages talk only through their artifacts, and a crash or a
kill ends one stage, after which the same command continues from there. A fresh Python process spends seconds
importing torch, transformers, Hydra and matplotlib before it does anything (about 7 s on one of this project's
2-core CI machines), paid again by every stage. `run_cli` pays it once: Python's own forkserver
(`multiprocessing`'s "forkserver" start method, the way PyTorch documents for starting processes safely) is a
fresh process that imports `rlhf_cli.engine.preload` and nothing else, then forks one child per call. A child runs
exactly what `python -m rlhf_cli <words>` runs: its own Hydra run, its own output, its own exit code. The server
never runs a stage's work (no tensor math, no thread pool, no CUDA), so a child computes what a fresh process
computes, digit for digit (tested).

As with any forkserver, the calling program's main module must be safe to import (each child imports it, as
`multiprocessing` does): the `rlhf` script and `python -m rlhf_cli` are.

Where that cannot hold, `run_cli` starts `python -m rlhf_cli` fresh instead, as `subprocess` does: off Linux (macOS
frameworks are not fork-safe), when `RLHF_CLI_FRESH_PROCESSES=1`, and for a call whose environment differs from the
server's in a variable that a library may read at import time (anything but RUNTIME_ENV).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import traceback
from pathlib import Path

# Read when used, not when imported: a call may differ from the server's environment in these and still fork.
RUNTIME_ENV = frozenset({"COLUMNS", "LINES", "COMP_LINE", "COMP_POINT", "PWD", "OLDPWD", "PYTEST_CURRENT_TEST"})
FRESH_ENV = "RLHF_CLI_FRESH_PROCESSES"
_server_env: dict[str, str] | None = None


def available() -> bool:
    """Whether children can be forked from a preloaded server here (see the module's docstring)."""
    return (sys.platform.startswith("linux") and os.environ.get(FRESH_ENV, "") in ("", "0")
            and "forkserver" in multiprocessing.get_all_start_methods())


def start() -> bool:
    """Start the preloading server now (it imports in the background; this returns at once); False where
    `available` says no. Idempotent: one server per process, started by the first call."""
    global _server_env
    if not available():
        return False
    if _server_env is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["rlhf_cli.engine.preload"])
        from multiprocessing import forkserver

        _server_env = dict(os.environ)  # what the server's imports saw
        forkserver.ensure_running()
    return True


def run_cli(words: list[str], *, cwd: str | Path | None = None, env: dict[str, str] | None = None,
            stdout: str | Path | None = None, stderr: str | Path | None = None,
            timeout: float | None = None) -> int:
    """The exit code of `rlhf <words>` (negative: killed by that signal), run in `cwd` with `env` (default: ours),
    its output written to the files `stdout`/`stderr` (default: where ours goes). Forked from the preloaded server
    (started here if need be) when `available` and `env` allows, else a fresh `python -m rlhf_cli`. Past `timeout`
    seconds the child is killed and subprocess.TimeoutExpired raised, as `subprocess.run` does."""
    env = dict(os.environ) if env is None else dict(env)
    if not (start() and forks(env)):
        return _fresh(words, cwd, env, stdout, stderr, timeout)
    for stream in (sys.stdout, sys.stderr):  # ours first, then the child's
        stream.flush()
    outputs = [_Inherited(fd) if path is None else str(Path(path).resolve()) for fd, path in ((1, stdout), (2, stderr))]
    child = multiprocessing.get_context("forkserver").Process(
        target=_serve, args=(list(words), str(cwd or os.getcwd()), env, *outputs),
        name=f"rlhf {' '.join(words[:1])}")
    child.start()
    try:
        child.join(timeout)
    except KeyboardInterrupt:  # Ctrl-C reached the child too: let it stop as it does, then stop
        child.join()
        raise
    if child.exitcode is None:
        child.kill()
        child.join()
        raise subprocess.TimeoutExpired(["rlhf", *words], timeout)
    return child.exitcode


def forks(env: dict[str, str]) -> bool:
    """Whether a started server may fork a child with environment `env`: it differs from the server's only in
    RUNTIME_ENV."""
    server = _server_env or {}
    return all(env.get(k) == server.get(k) for k in (set(env) | set(server)) - RUNTIME_ENV)


def _fresh(words, cwd, env, stdout, stderr, timeout) -> int:
    with _opened(stdout) as out, _opened(stderr) as err:
        return subprocess.run([sys.executable, "-m", "rlhf_cli", *words], cwd=cwd, env=env, stdout=out, stderr=err,
                              timeout=timeout).returncode


def _opened(path):
    """open(path, "w"), or a context of None (the output inherited) when there is no path."""
    return contextlib.nullcontext() if path is None else open(path, "w")


class _Inherited:
    """One of our file descriptors, sent to the forked child with its fork request (multiprocessing's DupFd, made
    while the request is pickled); `detach()` in the child gives its number there."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import context

        popen = context.get_spawning_popen()
        return _same, (popen.DupFd(popen.duplicate_for_child(self.fd)),)


def _same(x):
    return x


def _serve(words: list[str], cwd: str, env: dict[str, str], stdout, stderr) -> None:
    """In the forked child: `cd cwd`, `env`, its output (a file's path, or the caller's own descriptor), then what
    `python -m rlhf_cli <words>` does, then exit (atexit handlers included) without returning into multiprocessing's
    machinery."""
    code = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for fd, where in ((1, stdout), (2, stderr)):
            target = (os.open(where, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if isinstance(where, str)
                      else where.detach())
            os.dup2(target, fd)
            os.close(target)
        import runpy

        sys.argv = ["rlhf_cli", *words]
        sys.path[0] = cwd  # as `python -m` sets it
        runpy.run_module("rlhf_cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - a bug: its traceback, as a fresh process would print it
        traceback.print_exc()
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        finally:
            os._exit(code)
