"""PPO math for language models: KL estimates, per-token rewards, GAE, whitening, the clipped losses and the
statistics logged beside them (pure torch, no I/O). The log-prob math of any LM stage lives here too: per token
(`logprobs_from_logits`, `logprobs_and_entropy`) and per sequence (`sequence_logprobs`, what DPO compares).

Conventions. Per-token tensors are [B, T] over RESPONSE tokens only: position t is the t-th generated token.
`mask` is [B, T] (bool, int or float), 1 for real response tokens (up to and including the first stop token) and
0 for the padding after it; masks are right-padded. Log-probs are those of the sampled tokens. Values on padding
positions are never read: they may hold garbage (even inf/NaN) without leaking into any result or gradient,
because they are selected away with `torch.where` rather than multiplied by 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_cli.rl.masks import as_bool, last_index

__all__ = [
    "masked_sum", "masked_mean", "masked_var", "masked_whiten", "kl_per_token", "per_token_rewards",
    "gae", "policy_loss", "value_loss", "entropy_from_logits", "logprobs_from_logits", "logprobs_and_entropy",
    "sequence_logprobs", "explained_variance", "aggregate", "loss_normaliser",
    "adaptive_kl_update", "apply_missing_eos_penalty", "normalize_scores", "truncate_after_stop",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


# ---------------------------------------------------------------------------------------------- masked reductions

def _weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask as weights in the floating dtype of `like`."""
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return mask.to(dtype)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ_{valid} m·x, over all entries (dim=None, a scalar) or along `dim`.

    Padding entries are replaced by 0 before multiplying, so inf/NaN there cannot leak in.
    """
    w = _weights(mask, x)
    xm = torch.where(as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device)) * w
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ m·x / Σ m over all entries (dim=None, a scalar) or along `dim`.

    Where Σ m = 0 (nothing valid) the result is 0, with a finite (zero) gradient, never NaN.
    """
    w = _weights(mask, x)
    n = w.sum() if dim is None else w.sum(dim)
    n = torch.where(n > 0, n, torch.ones_like(n))
    return masked_sum(x, mask, dim) / n


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of `x` (a scalar over the whole tensor):

        μ = masked_mean(x),  var = Σ m·(x − μ)² / Σ m,  and with Bessel's correction (unbiased) · n/(n − 1)

    where n = Σ m. Guard: with unbiased=True and n < 2 the variance is undefined; 0 is returned (no spread can be
    measured). With nothing valid the result is 0 either way.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _weights(mask, x).sum()
        bessel = torch.where(n > 1, n / torch.where(n > 1, n - 1, torch.ones_like(n)), torch.zeros_like(n))
        var = var * bessel
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten the valid entries of `x` together (one mean and one variance over the whole tensor):

        x̂ = (x − μ) / sqrt(σ² + eps)          μ = masked_mean(x), σ² = masked_var(x, unbiased=True)
        shift_mean=False:  x̂ + μ              (rescaled to std 1, original mean kept; TRL's convention)

    Padding positions are returned as 0. Tiny-batch guard: with fewer than 2 valid entries there is no variance,
    so the result is x − μ (i.e. 0), or x itself when shift_mean=False, masked; never NaN.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    n = _weights(mask, x).sum()
    scale = torch.where(n >= 2, torch.rsqrt(var + eps), torch.ones_like(var))
    whitened = (x - mean) * scale
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(as_bool(mask), whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# ----------------------------------------------------------------------------------------------------- KL, rewards

def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of the sampled tokens (Schulman's estimators):

        k1 = logp − ref_logp                                    (unbiased; negative on single tokens is normal)
        k2 = ½ (logp − ref_logp)²                               (biased, ≥ 0; as a loss its gradient is the KL's)
        k3 = (r − 1) − log r,   r = exp(ref_logp − logp)        (unbiased, ≥ 0, lower variance)

    k3 is computed as expm1(log r) − log r for precision near r = 1. Unknown estimator: ValueError.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        log_r = ref_logp - logp
        return (torch.expm1(log_r) - log_r).clamp_min(0.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def per_token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float | torch.Tensor) -> torch.Tensor:
    """The per-token RLHF reward [B, T]:

        r_t = −kl_coef · kl_t  +  1[t = last_index(mask)_b] · score_b      on valid tokens, 0 on padding

    The sequence score goes on the LAST VALID response token (the one that ends the response: its stop token,
    or position T − 1 for a response that hit the length limit), not on the first pad after it (TRL's off-by-one).
    A row with no valid token gets no reward at all (its score is dropped).
    """
    valid = as_bool(mask)
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    add = torch.where(valid.any(-1), score.to(rewards.dtype), torch.zeros((), dtype=rewards.dtype,
                                                                          device=rewards.device))
    return rewards.index_put((rows, last_index(mask)), add, accumulate=True)


# ------------------------------------------------------------------------------------------------------ advantages

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over each (right-padded) response:

        δ_t = r_t + γ·V_{t+1} − V_t          with V_{t+1} = 0 after the last valid token
        A_t = δ_t + γλ·A_{t+1}               with A_{t+1} = 0 after the last valid token
        R_t = A_t + V_t                      (the value targets, computed before any whitening)

    Rewards and values on padding are ignored; padding positions are 0 in both outputs. Returns
    (advantages, returns), each [B, T]. Pass detached tensors: these are targets, not part of the graph.
    """
    valid = as_bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(valid, rewards.to(values.dtype), zero)
    v = torch.where(valid, values, zero)
    batch, length = v.shape
    next_value = torch.zeros(batch, dtype=v.dtype, device=v.device)
    next_adv = torch.zeros(batch, dtype=v.dtype, device=v.device)
    reversed_adv = []
    for t in reversed(range(length)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = torch.where(valid[:, t], delta + gamma * lam * next_adv, zero)
        next_value = v[:, t]
        reversed_adv.append(next_adv)
    advantages = torch.stack(reversed_adv[::-1], dim=1) if length else torch.zeros_like(v)
    returns = torch.where(valid, advantages + v, zero)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------- losses

def loss_normaliser(mask: torch.Tensor, how: str) -> float:
    """This batch's share of the normaliser N of `aggregate` (sum it over every micro-batch and process of an
    optimizer step): its valid tokens (token_mean) or its responses (the seq_mean_* modes)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")
    return float(_weights(mask, mask).sum()) if how == "token_mean" else float(mask.shape[0])


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str, norm: float, max_len: int = 1) -> torch.Tensor:
    """A per-token loss x [B, T] reduced to this micro-batch's share of the optimizer step's loss:

        token_mean               Σ_b Σ_t m·x / N                 N = valid tokens in the whole step
        seq_mean_token_mean      Σ_b (Σ_t m·x / n_b) / N         N = responses in the step, n_b = b's tokens
        seq_mean_token_sum_norm  Σ_b (Σ_t m·x / max_len) / N     (Dr. GRPO: a constant, not the length, divides)

    N counts every micro-batch and process of the step (`loss_normaliser`, summed), so the gradient of the summed
    micro-batch losses is the same however the step is split. Divide N by the number of processes whose gradients
    are averaged (DDP, FSDP) to keep that true across processes. With one micro-batch token_mean is masked_mean.
    """
    if how == "token_mean":
        return masked_sum(x, mask) / norm
    if how == "seq_mean_token_mean":
        return masked_mean(x, mask, dim=-1).sum() / norm
    if how == "seq_mean_token_sum_norm":
        return (masked_sum(x, mask, dim=-1) / max_len).sum() / norm
    raise ValueError(f"unknown loss aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, cliprange_high: float | None = None,
                reduce=masked_mean) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, averaged over valid tokens (ε = cliprange, ε_high = cliprange_high, default ε):

        ratio = exp(logp_new − logp_old)
        L_π   = masked_mean( max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε_high)) )

    ε_high > ε is DAPO's "clip higher" (Yu et al., 2025). `reduce(per_token, mask)` replaces masked_mean in L_π
    (e.g. `aggregate` over a whole optimizer step); the stats below stay this batch's token means.

    Stats (detached scalars):
        clipfrac   = masked_mean(1[−A·clip(ratio) > −A·ratio])    (share of tokens taking the clipped branch)
        approx_kl  = 0.5 · masked_mean((logp_new − logp_old)²)
    With logp_new == logp_old (first minibatch of the first epoch) the loss is −masked_mean(A), clipfrac 0 and
    approx_kl 0 exactly.
    """
    valid = as_bool(mask)
    zero = torch.zeros((), dtype=logp_new.dtype, device=logp_new.device)
    log_ratio = torch.where(valid, logp_new - logp_old, zero)   # 0 on padding: exp stays finite, gradient 0
    adv = torch.where(valid, advantages.to(logp_new.dtype), zero)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    high = cliprange if cliprange_high is None else cliprange_high
    clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    loss = reduce(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask),
        }
    return loss, stats


def value_loss(values_new: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, reduce=masked_mean) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, averaged over valid tokens (ε_v = cliprange_value):

        V_clip = V_old + clip(V_new − V_old, −ε_v, ε_v)
        L_V    = 0.5 · masked_mean( max((V_new − R)², (V_clip − R)²) )

    Stats (detached scalars): vf_clipfrac = masked_mean(1[(V_clip − R)² > (V_new − R)²]). `reduce` as in
    `policy_loss`.
    """
    valid = as_bool(mask)
    zero = torch.zeros((), dtype=values_new.dtype, device=values_new.device)
    v_old = torch.where(valid, values_old.to(values_new.dtype), zero)
    v_new = torch.where(valid, values_new, v_old)                  # padding: V_new = V_old = R = 0, finite
    ret = torch.where(valid, returns.to(values_new.dtype), zero)
    v_clip = v_old + torch.clamp(v_new - v_old, -cliprange_value, cliprange_value)
    loss_unclipped = (v_new - ret) ** 2
    loss_clipped = (v_clip - ret) ** 2
    loss = 0.5 * reduce(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).to(loss.dtype), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------- logits

def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) at each position, the last dim reduced:

        H = logsumexp(z) − Σ_i softmax(z)_i · z_i

    Entries of z equal to −inf (masked vocabulary) contribute 0. Pass logits / T for the sampling distribution.
    """
    probs = torch.softmax(logits, dim=-1)
    z = torch.where(torch.isfinite(logits), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    return torch.logsumexp(logits, dim=-1) - (probs * z).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) gathered at `tokens`:  z_tok / T − logsumexp(z / T), in float32.

    logits [..., V], tokens [...] → [...]. `temperature` is required on purpose: the rollout log-probs, the
    reference log-probs and the training log-probs must all use the sampling temperature T, or the ratio is not
    1 on the first minibatch and the KL is biased. Computed chunk-wise (`logprobs_and_entropy`): half-precision
    logits are upcast a few rows at a time, and no [..., V] float32 tensor is kept for the backward pass.
    """
    return logprobs_and_entropy(logits, tokens, temperature, entropy=False)[0]


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Log-probability of each row's response under the model, summed over its response tokens:

        log π(y_b | x_b) = Σ_t m_bt · log softmax(z_bt / T)[y_bt]

    logits [B, T, V] (z_bt: the logits that predict token y_bt), tokens [B, T], mask [B, T] (1 on the response
    tokens to count, 0 elsewhere: prompt, padding) → [B] in float32 (float64 for float64 logits). A row with no
    masked-in token gets 0. Tokens where the mask is 0 are never read (any id, even -100, is allowed there).
    `temperature` as in `logprobs_from_logits` (DPO and its relatives use T = 1).
    """
    valid = as_bool(mask)
    safe = torch.where(valid, tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
    return masked_sum(logprobs_from_logits(logits, safe, temperature), mask, dim=-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                         entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(token), H) of the distribution p = softmax(z / T) at each position, in float32 (float64 for
    float64 logits), fused and chunked:

        u = z / T,   l = logsumexp(u),   log p = u − l
        logp = u_tok − l                    H = −Σ_i p_i·log p_i      (entries with z_i = −inf contribute 0)

    and, in the backward pass, with upstream gradients g (of logp) and h (of H):

        ∂/∂z_i = [ g·(1[i = tok] − p_i)  −  h·p_i·(log p_i + H) ] / T

    logits [..., V] in any floating dtype, tokens [...] → two [...] float32 tensors (H is None when `entropy` is
    false). A few rows at a time are upcast to float32 (`chunk_rows`); the backward pass recomputes p from the
    logits it keeps, so no [..., V] float32 tensor is materialised, let alone twice: the memory and time of the
    softmax stay proportional to one chunk (Liger-style, in plain torch). `temperature` > 0, else ValueError.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = tokens.shape
    flat = logits.reshape(-1, logits.shape[-1])
    logp, ent = _LogprobEntropy.apply(flat, tokens.reshape(-1).long(), float(temperature), bool(entropy),
                                      chunk_rows(flat))
    return logp.reshape(shape), (ent.reshape(shape) if entropy else None)


def chunk_rows(logits: torch.Tensor) -> int:
    """Rows of [N, V] logits upcast at a time: about 2^18 values (1 MiB of float32, cache-sized) on a CPU, 2^26 on
    an accelerator (large enough that kernel launches do not dominate)."""
    budget = 2 ** 18 if logits.device.type == "cpu" else 2 ** 26
    return max(1, budget // max(1, logits.shape[-1]))


class _LogprobEntropy(torch.autograd.Function):
    """The autograd form of `logprobs_and_entropy` on [N, V] logits (see its docstring for the formulas)."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, with_entropy, rows):
        n, work = logits.shape[0], torch.promote_types(logits.dtype, torch.float32)
        logp = torch.empty(n, dtype=work, device=logits.device)
        ent = torch.zeros(n, dtype=work, device=logits.device)
        lse = torch.empty_like(logp)
        tiny = torch.finfo(work).min
        for i in range(0, n, rows):
            u = logits[i:i + rows].to(work) / temperature
            lse[i:i + rows] = l = torch.logsumexp(u, dim=-1)
            log_p = u.sub_(l.unsqueeze(-1))                     # in place: log p
            logp[i:i + rows] = log_p.gather(-1, tokens[i:i + rows].unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                log_p.clamp_(min=tiny)                          # z = −inf: p = 0 and p·log p = 0, not NaN
                ent[i:i + rows] = -(log_p.exp() * log_p).sum(-1)
        ctx.save_for_backward(logits, tokens, lse, ent)
        ctx.temperature, ctx.with_entropy, ctx.rows = temperature, with_entropy, rows
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits, tokens, lse, ent = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        grad = torch.empty_like(logits)
        tiny = torch.finfo(lse.dtype).min
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(lse.dtype)
        use_ent = ctx.with_entropy and g_ent is not None
        for i in range(0, logits.shape[0], rows):
            c = slice(i, i + rows)
            log_p = (logits[c].to(lse.dtype) / t).sub_(lse[c].unsqueeze(-1)).clamp_(min=tiny)
            p = log_p.exp()
            g = g_logp[c].unsqueeze(-1)
            if use_ent:   # −h·p·(log p + H) − g·p
                coef = log_p.add_(ent[c].unsqueeze(-1)).mul_(-g_ent[c].to(lse.dtype).unsqueeze(-1)).sub_(g)
            else:
                coef = g.neg().expand_as(p)
            gu = p.mul_(coef)
            gu.scatter_add_(-1, tokens[c].unsqueeze(-1), g)
            grad[c] = gu.div_(t)
        return grad, None, None, None, None


# ------------------------------------------------------------------------------------------------------ statistics

def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over valid tokens (a detached scalar; 1 = perfect, 0 = no better than a constant,
    negative = worse than a constant).

    When Var[R] = 0 (or fewer than 2 valid tokens) nothing can be explained: the result is 0.0, never NaN.
    """
    with torch.no_grad():
        var_r = masked_var(returns, mask, unbiased=False)
        var_err = masked_var(returns - values, mask, unbiased=False)
        safe = torch.where(var_r > 0, var_r, torch.ones_like(var_r))
        return torch.where(var_r > 0, 1.0 - var_err / safe, torch.zeros_like(var_r))


def adaptive_kl_update(kl_coef: float, observed_kl: float | torch.Tensor, target: float, horizon: float,
                       n_steps: int) -> float:
    """Ziegler et al. (2019) adaptive KL controller, one update after `n_steps` samples:

        e = clip(KL_observed / KL_target − 1, −0.2, 0.2)
        kl_coef ← kl_coef · (1 + e · n_steps / horizon)

    Pure: returns the new coefficient as a float.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
    error = min(max(float(observed_kl) / target - 1.0, -0.2), 0.2)
    return float(kl_coef) * (1.0 + error * n_steps / horizon)


def apply_missing_eos_penalty(scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """s_b − penalty · 1[response b did not end with a stop token].

    Sign convention: `penalty` is a non-negative amount SUBTRACTED from the score, so missing_eos_penalty=1.0
    lowers the score of a truncated response by 1. A negative penalty raises ValueError. Returns a new tensor.
    """
    if penalty < 0:
        raise ValueError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {penalty}")
    missing = (~ended_with_eos.bool()).to(scores.dtype)
    return scores - penalty * missing


def normalize_scores(scores: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor,
                     eps: float = 1e-8) -> torch.Tensor:
    """(s − mean) / (std + eps): scores shifted and scaled by statistics measured under the SFT policy."""
    return (scores - mean) / (std + eps)


# -------------------------------------------------------------------------------------------------------- rollout

def truncate_after_stop(tokens: torch.Tensor, stop_ids: int | Sequence[int],
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut generated responses [B, T] at their first stop token.

        s_b   = index of the first token of row b in stop_ids (T − 1 when there is none)
        mask  = 1[t ≤ s_b]                   (the stop token itself is part of the response)
        out   = tokens where mask else pad_id

    Only the FIRST stop token counts: anything the model generated after it (more tokens, more stop tokens, pad
    ids) becomes pad_id. Pad ids generated BEFORE the first stop token are kept as they are (they are real
    samples). Returns (tokens, mask as int64, ended_with_stop bool [B]).
    """
    ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    stops = torch.tensor(ids, dtype=tokens.dtype, device=tokens.device)
    is_stop = torch.isin(tokens, stops)
    ended = is_stop.any(-1)
    length = tokens.shape[-1]
    first = torch.where(ended, is_stop.to(torch.uint8).argmax(-1), torch.full_like(ended, length - 1,
                                                                                  dtype=torch.long))
    positions = torch.arange(length, device=tokens.device)
    keep = positions.unsqueeze(0) <= first.unsqueeze(-1)
    out = torch.where(keep, tokens, torch.full_like(tokens, pad_id))
    return out, keep.long(), ended
