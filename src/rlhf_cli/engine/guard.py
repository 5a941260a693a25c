"""Stopping a run that diverged, before a NaN reaches the weights, a checkpoint or an artifact.

Every loss, gradient norm, score, KL and value a stage acts on passes through a `Guard`:
- `step_ok` before an optimizer step: a NaN/inf loss or gradient norm skips the update (the gradients are dropped)
  at most `train.max_skipped_steps` times over the run, then stops the stage;
- `require_finite` for numbers no skipping can fix (a reward model's score, the KL of a rollout): stops at once.
Stopping raises DivergedError (exit code 3): the stage, the step, which quantity, the last good checkpoint, and
what to try. The checks read numbers the loop has already synchronised (the logged loss, the clipped gradient
norm), so they cost no extra device sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cli.engine import checkpoint
from rlhf_cli.errors import DivergedError


def _nonfinite(value) -> str | None:
    """None when finite; else how it is not ("nan", "inf", or "nan for 3 of 16")."""
    if torch.is_tensor(value):
        bad = ~torch.isfinite(value.detach())
        n_bad = int(bad.sum())
        if not n_bad:
            return None
        kind = "nan" if bool(torch.isnan(value.detach()).any()) else "inf"
        return kind if value.numel() == 1 else f"{kind} for {n_bad} of {value.numel()}"
    value = float(value)
    return None if math.isfinite(value) else str(value)


@dataclass
class Guard:
    stage: str                  # "sft", "reward", "ppo"
    checkpoints: Path           # where the last good checkpoint is looked up
    lr: float                   # named in the hint
    max_skipped: int = 0        # train.max_skipped_steps
    skipped: int = 0            # steps skipped so far (part of the checkpoint state)
    unit: str = "step"          # "step" or "iteration", as the stage counts

    def step_ok(self, step: int, **values) -> bool:
        """True when every value is finite. Else False while the skip budget lasts (the caller drops the update),
        and DivergedError once it is spent."""
        bad = {name: how for name, how in ((n, _nonfinite(v)) for n, v in values.items()) if how}
        if not bad:
            return True
        if self.skipped < self.max_skipped:
            self.skipped += 1
            return False
        name, how = next(iter(bad.items()))
        raise self._stop(step, name.replace("_", " "), how)

    def require_finite(self, step: int, name: str, value, hint: str | None = None) -> None:
        how = _nonfinite(value)
        if how:
            raise self._stop(step, name, how, hint)

    def _stop(self, step: int, name: str, how: str, hint: str | None = None) -> DivergedError:
        last = checkpoint.latest(self.checkpoints)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        skipped = f", after {self.skipped} skipped step{'s' if self.skipped != 1 else ''}" if self.skipped else ""
        again = ("continue from that checkpoint with resume=true force_resume=true and a lower optim.lr"
                 if last else "start over with overwrite=true and a lower optim.lr")
        return DivergedError(
            f"{self.stage}: the {name} is {how} at {self.unit} {step}{skipped}; stopped before it reached the weights "
            f"or a file ({where})",
            hint=hint or f"the run diverged: {again} (now {self.lr:g}); train.max_skipped_steps=N skips up to N "
                         f"such steps")
