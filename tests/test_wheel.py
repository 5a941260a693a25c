"""The command as a user gets it from `pip install rlhf-cli`: a non-editable install of the built wheel, in a fresh
virtual environment, run from a directory that is not the checkout.

The wheel is built from this checkout (hatchling; `conf/` is force-included as `rlhf_cli/conf`), then installed with
`--no-deps` into a new venv. Its dependencies (torch, transformers, ...) are not downloaded again: a `.pth` file in
the new venv's site-packages names this interpreter's site-packages as one more plain sys.path entry. The `.pth`
files *inside* that directory are not processed (only site directories get that), so the editable install of
rlhf_cli in the outer venv (a `.pth` pointing at src/) stays invisible and the packaged copy is what runs.

A wheel build that fails (e.g. no network to fetch hatchling) fails this test; it never skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow

# A real, very short SFT run: enough to write the whole artifact.
SHORT_SFT = [
    "experiment=w", "train.max_steps=3", "data.toy.num_train=64", "data.toy.num_eval=8",
    "train.examples_per_step=8", "train.micro_batch_size=8", "train.num_samples=1", "train.sample_max_new_tokens=4",
]
CONF_FILES = ["sft.yaml", "layout.yaml", "model/tiny.yaml", "model/gpt2.yaml", "model/qwen.yaml", "data/toy.yaml",
              "data/hh_sft.yaml", "optim/adamw.yaml", "optim/adamw_small_lr.yaml"]


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _clean_env() -> dict:
    """The test's environment (offline hubs, RLHF_CLI_CACHE) minus anything that could put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "HYDRA_FULL_ERROR")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONNOUSERSITE="1", COLUMNS="200")
    assert env.get("RLHF_CLI_CACHE"), "conftest sets RLHF_CLI_CACHE"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, REPO], cwd=out)
    wheels = list(out.glob("rlhf_cli-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> dict:
    """A new venv holding only the installed wheel, with this interpreter's site-packages visible for its deps."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    # This pip, running under the fresh interpreter, installs into the fresh venv; done before the .pth below
    # exists, so pip sees an empty environment and cannot touch the outer one.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
          "--disable-pip-version-check", wheel], cwd=venv.parent, env=_clean_env())
    site_dir = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=venv.parent, env=_clean_env()).stdout.strip())
    assert site_dir.is_dir() and site_dir.is_relative_to(venv), site_dir
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # ordered, deduplicated
    (site_dir / "_outer_deps.pth").write_text("".join(f"{p}\n" for p in outer))
    return {"venv": venv, "python": python, "rlhf": venv / "bin" / "rlhf", "site": site_dir}


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A working directory outside the checkout."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    assert not cwd.resolve().is_relative_to(REPO.resolve())
    return cwd


def test_wheel_ships_the_config_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in CONF_FILES:
        assert f"rlhf_cli/conf/{rel}" in names, sorted(names)
    assert "rlhf_cli/cli.py" in names and "rlhf_cli/stages/sft.py" in names
    assert not any(n.startswith(("src/", "conf/", "tests/")) for n in names), sorted(names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "rlhf = rlhf_cli.cli:entrypoint" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_fresh_venv_imports_the_packaged_copy(fresh_venv, workdir):
    code = ("import json, rlhf_cli, rlhf_cli.cli, torch, transformers; "
            "print(json.dumps({'file': rlhf_cli.__file__, 'conf': str(rlhf_cli.cli.conf_dir())}))")
    seen = json.loads(_run([fresh_venv["python"], "-c", code], cwd=workdir, env=_clean_env()).stdout)
    site = fresh_venv["site"].resolve()
    assert Path(seen["file"]).resolve().is_relative_to(site), seen  # not the editable checkout
    assert Path(seen["conf"]).resolve() == site / "rlhf_cli" / "conf", seen
    assert (site / "rlhf_cli" / "conf" / "sft.yaml").is_file()


def test_help_and_cfg_from_any_directory(fresh_venv, workdir):
    env = _clean_env()
    helped = _run([fresh_venv["rlhf"], "--help"], cwd=workdir, env=env)
    assert "sft" in helped.stdout and "fine-tune" in helped.stdout
    cfg = _run([fresh_venv["rlhf"], "sft", "--cfg", "job"], cwd=workdir, env=env)
    assert "max_steps:" in cfg.stdout and "name_or_path: builtin:tiny" in cfg.stdout, cfg.stdout
    assert list(workdir.iterdir()) == [], list(workdir.iterdir())  # --cfg writes nothing


def test_short_sft_run_writes_the_artifact_under_cwd(fresh_venv, workdir):
    proc = _run([fresh_venv["rlhf"], "sft", *SHORT_SFT], cwd=workdir, env=_clean_env())
    run_dir = workdir / "runs" / "w" / "sft"
    assert (run_dir / "manifest.json").is_file(), proc.stdout + proc.stderr
    assert (run_dir / "model" / "config.json").is_file()
    assert (run_dir / "model" / "model.safetensors").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["metrics"]["steps"] == 3, manifest
    assert Path(manifest["config"]["run_dir"]).resolve() == run_dir.resolve()  # root=runs resolved against cwd
    assert not (workdir / "outputs").exists() and not (workdir / "multirun").exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["runs"]
