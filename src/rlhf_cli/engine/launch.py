"""`rlhf <words>` in a child process, started from a parent that has already imported the heavy libraries.

The pipeline runs each stage in a process of its own: stages talk only through their artifacts, and a crash or a
kill ends one stage, after which the same command continues from there. A fresh Python process spends seconds
importing torch, transformers, Hydra and matplotlib before it does anything (about 5 s of CPU time on a laptop
core), paid again by every stage. `run_cli` imports them once in the calling process (`preload`, while the first
child starts the usual way beside it, so on two cores the two sets of imports take the time of one) and forks each
later child from that state. A forked child runs exactly what `python -m rlhf_cli <words>` runs: its own Hydra
run, its own output, its exit code. Nothing of a stage's own work happens before the fork, so the child computes
what a fresh process computes, digit for digit.

The child is forked only where that is safe, else started fresh (`python -m rlhf_cli`, as `subprocess` does):
Linux (fork is its native way to start a process; macOS frameworks are not fork-safe), a PyTorch built without an
accelerator runtime (a CUDA runtime touched before a fork cannot be used after it, and nothing guarantees a library
import leaves it alone), and no other Python thread running in the parent (a fork copies only the calling thread).
"""

from __future__ import annotations

import atexit
import importlib
import os
import subprocess
import sys
import threading
import traceback

# Imported once by `preload`: what every stage process would import again (third-party first, then the layers
# below the stages that every stage uses). A missing optional one (matplotlib) is skipped.
PRELOAD = (
    "torch", "safetensors.torch", "transformers", "transformers.modeling_utils", "transformers.generation",
    "transformers.masking_utils", "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama", "transformers.tokenization_utils_tokenizers", "hydra", "omegaconf",
    "matplotlib.figure", "matplotlib.backends.backend_agg",
    "rlhf_cli.engine.train", "rlhf_cli.models.loading", "rlhf_cli.models.reward", "rlhf_cli.charts",
)
_preloaded = False


def preload() -> None:
    """Import PRELOAD into this process (once); nothing after torch where no child could be forked anyway."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        if name == "torch" and not can_fork():
            return


def can_fork() -> bool:
    """Whether a child forked from this process is as good as a fresh one (see the module's docstring)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork") or threading.active_count() != 1:
        return False
    torch = sys.modules.get("torch")
    if torch is None:
        return True
    accelerated = torch.backends.cuda.is_built() or getattr(torch._C, "_has_xpu", False) or torch.cuda.is_initialized()
    return not accelerated


def run_cli(words: list[str], fork: bool | None = None) -> int:
    """The exit code of `rlhf <words>` run in a child process (negative: killed by that signal), forked from this
    process when `can_fork` (or as `fork` says), else started fresh. Its output goes where ours goes.

    The first call starts its child fresh and preloads beside it: the child's imports and ours run at the same time
    on two cores, so the preload costs the pipeline no time; the calls after it fork."""
    if fork is None and not _preloaded:
        return _fresh_while_preloading(words)
    if fork is None:
        fork = can_fork()
    if not fork:
        return subprocess.run([sys.executable, "-m", "rlhf_cli", *words]).returncode
    for stream in (sys.stdout, sys.stderr):  # nothing of ours may be printed twice (once by the child)
        stream.flush()
    pid = os.fork()
    if pid == 0:
        _child(words)  # never returns
    try:
        _, status = os.waitpid(pid, 0)
    except KeyboardInterrupt:  # Ctrl-C reached the child too: let it stop as it does, then stop
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(status)


def _fresh_while_preloading(words: list[str]) -> int:
    child = subprocess.Popen([sys.executable, "-m", "rlhf_cli", *words])
    try:
        preload()
    except BaseException:  # Ctrl-C reached the child too: let it stop as it does, then stop
        child.wait()
        raise
    return child.wait()


def _child(words: list[str]) -> None:
    """In the forked child: what `python -m rlhf_cli <words>` does, then exit (atexit handlers included) without
    returning into the parent's call stack."""
    code = 1
    try:
        import runpy

        sys.argv = ["rlhf_cli", *words]
        sys.path[0] = os.getcwd()  # as `python -m` sets it
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
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        finally:
            os._exit(code)
