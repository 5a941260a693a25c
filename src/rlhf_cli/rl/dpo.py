"""DPO and its relatives: preference losses on sequence log-probs against a frozen reference (pure torch, no I/O).

Conventions. Every input is [B], one entry per preference pair: the log-probability of the chosen (resp.
rejected) response under the policy π and under the reference π_ref, each summed over the response tokens
(`ppo.sequence_logprobs`). Every loss in `LOSSES` takes the log-ratio difference

    h = logits = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))

together with β and the label smoothing ε, and returns the per-pair losses [B] (the caller reduces them). A loss
that has no use for ε ignores it (it is part of the table's one signature). Log-sigmoids are written with
`F.logsigmoid`, which is finite for any |β·h|.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["sigmoid_loss", "ipo_loss", "hinge_loss", "robust_loss", "LOSSES", "implicit_rewards", "nll_loss",
           "dpo_loss"]


def sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), with conservative-DPO label smoothing ε (cDPO, Mitchell 2023):

        L = −(1 − ε) · log σ(β h) − ε · log σ(−β h)

    ε is the assumed probability that a pair's labels are flipped; ε = 0 is plain DPO. The loss then pulls β·h
    towards log((1 − ε)/ε) instead of +∞.
    """
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def robust_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (rDPO, Chowdhury et al. 2024): an unbiased estimate of the DPO loss under label flips of rate ε:

        L = [ −(1 − ε) · log σ(β h) + ε · log σ(−β h) ] / (1 − 2ε)

    so that (1 − ε)·L(h) + ε·L(−h) = −log σ(β h). Needs 0 ≤ ε < 0.5 (ValueError otherwise); ε = 0 is plain
    DPO.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"the robust DPO loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    clean = -(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
    flipped = label_smoothing * F.logsigmoid(-beta * logits)
    return (clean + flipped) / (1.0 - 2.0 * label_smoothing)


def hinge_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SLiC's hinge on the log-ratio difference (Zhao et al. 2023), as TRL writes it (1/β is the margin on h):

        L = max(0, 1 − β h)

    ε is unused.
    """
    return torch.relu(1.0 - beta * logits)


def ipo_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, with τ = β): regress h onto a fixed margin instead of pushing it to +∞:

        L = (h − 1/(2β))²

    h is used exactly as given. From summed log-probs (this module's convention) the square grows with the
    response lengths; TRL's IPO instead builds h from log-probs averaged over each response's tokens
    (log π(y)/|y|), which the IPO authors confirm is what their results use: pass such averaged log-probs to get
    that form. ε is unused.
    """
    return (logits - 1.0 / (2.0 * beta)) ** 2


LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
}


def implicit_rewards(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards of the chosen and rejected responses, each [B]:

        r(y) = β · (log π(y) − log π_ref(y))

    (the reward the policy is optimal for, up to a per-prompt constant that cancels in r_c − r_r = β h).
    """
    return beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def nll_loss(logp_chosen_sum: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The SFT term on the chosen response (RPO, Pang et al. 2024; Llama 3.1), per pair [B]:

        NLL = −log π(y_c) / n_c          n_c = the chosen response's token count (clamped to ≥ 1)

    i.e. the mean negative log-likelihood per token of the chosen response.
    """
    n = chosen_tokens.to(logp_chosen_sum.dtype).clamp(min=1.0)
    return -logp_chosen_sum / n


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, kind: str, beta: float,
             label_smoothing: float = 0.0, nll_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-pair loss [B] of one preference loss plus the optional NLL term on the chosen response:

        h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
        L = LOSSES[kind](h, β, ε) + nll_coef · nll_loss(log π(y_c), n_c)

    and detached per-pair statistics: rewards_chosen r_c, rewards_rejected r_r (`implicit_rewards`),
    accuracy 1[r_c > r_r] (as a float), margin r_c − r_r. Unknown kind: ValueError.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}; expected one of {', '.join(LOSSES)}")
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    loss = LOSSES[kind](logits, beta, label_smoothing)
    if nll_coef:
        loss = loss + nll_coef * nll_loss(policy_chosen, chosen_tokens)
    with torch.no_grad():
        r_chosen, r_rejected = implicit_rewards(policy_chosen.detach(), policy_rejected.detach(),
                                                ref_chosen.detach(), ref_rejected.detach(), beta)
        stats = {
            "rewards_chosen": r_chosen,
            "rewards_rejected": r_rejected,
            "accuracy": (r_chosen > r_rejected).to(r_chosen.dtype),
            "margin": r_chosen - r_rejected,
        }
    return loss, stats
