"""Preparing a stage's run directory on every rank: refuse, resume or start clean (see artifacts.py)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from rlhf_cli import artifacts
from rlhf_cli.config import to_dict
from rlhf_cli.engine import checkpoint, dist


def prepare(cfg, d: dist.Dist) -> Path | None:
    """Decide on every rank (read-only), then let rank 0 clean up and write config.yaml. Returns the checkpoint
    to resume from, or None for a fresh start."""
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume_from, clean = artifacts.plan_run_dir(run_dir, cfg.stage, cfg.overwrite, cfg.resume,
                                                checkpoint.latest(ckpt_dir))
    dist.barrier(d)
    if d.is_main:
        if clean:
            artifacts.clean_run_dir(run_dir)
        checkpoint.clean_partial(ckpt_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(to_dict(cfg)))
    dist.barrier(d)
    return resume_from
