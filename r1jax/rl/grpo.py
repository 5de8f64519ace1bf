"""GRPO math: group advantages, the clipped policy loss (token or GSPO sequence ratio) with a k3 KL term, token entropy.

Pure, jittable functions; the RL train step composes them. Dimension letters: B prompts, G samples per
prompt (group size), N = B*G sequences, T completion length (padded), V vocabulary.

Advantages (DeepSeekMath, outcome supervision; every token of o_i gets the same advantage):

    Â_i = (r_i − b_i) / (s + eps)

    b_i = mean_{j in group(i)} r_j                  baseline="mean" (the paper)
    b_i = mean_{j in group(i), j != i} r_j          baseline="loo"  (leave-one-out, RLOO); equals
                                                    G/(G−1) · (r_i − mean) so it only rescales "mean"
    s   = std of the rewards in the group           scale="group" (the paper)
    s   = std of all N rewards of the batch          scale="batch" (group mean, batch std)
    s   = 1, no division                             scale="none"  (Dr. GRPO)

  std is the *sample* std (ddof=1, Bessel-corrected). The paper writes std(r) without saying which; the
  reference implementations practitioners compare against (TRL, verl, OpenRLHF) call torch.std, which is
  ddof=1, so advantages match theirs. It is larger than the population std by sqrt(G/(G−1)) (3% at
  G=16), hence needs G >= 2. A group whose rewards are all equal has zero advantage for every sample
  and contributes no policy gradient; it is set to exactly 0 and counted (`zero_std_frac`).

Objective (DeepSeekMath eq. 3, maximised), per token t of completion o_i:

    ρ_it  = π_θ(o_it) / π_old(o_it) = exp(logp − old_logp)
    S_it  = min(ρ_it Â_i, clip(ρ_it, 1 − ε_low, 1 + ε_high) Â_i)
    KL_it = π_ref/π_θ − log(π_ref/π_θ) − 1 = exp(ref − logp) − (ref − logp) − 1    (k3, Schulman 2020)
    ℓ_it  = −(S_it − β KL_it)                                                       (per-token loss)

  k3 is an unbiased estimate of KL(π_θ || π_ref) under samples from π_θ and is >= 0 token by token
  (e^x − x − 1 >= 0); it is a loss term, not a reward penalty.
  Clip-higher (DAPO): ε_high > ε_low (e.g. 0.2 / 0.28) lets low-probability tokens grow further before
  the ratio is clipped, which fights entropy collapse; ε_low = ε_high is the symmetric PPO clip.
  μ (updates per batch of samples): at μ = 1 the caller passes old_logp = stop_gradient(logp), so ρ = 1 and
  only ∇ρ = ∇logp matters (the loss value is −Σ Â / normaliser plus the KL term). At μ > 1, old_logp are the
  log-probs at sampling time (recomputed once by the trainer's forward, with the same temperature
  division as the sampler, to avoid sampler/trainer mismatch) and stay fixed over the μ updates, so
  ρ ≠ 1 and the clip becomes active.

Aggregation of ℓ over masked tokens (m_it = 1 for real completion tokens, |o_i| = Σ_t m_it):

    "seq-mean-token-mean"      1/N' Σ_i 1/|o_i| Σ_t m_it ℓ_it   the paper; N' = rows with |o_i| > 0.
                               Every sequence weighs the same, so a token of a long sequence weighs
                               less: long wrong answers are penalised less per token than short ones
                               (length bias: it rewards growing wrong answers).
    "token-mean"               Σ_it m_it ℓ_it / Σ_it m_it        DAPO, verl default. Every token weighs
                               the same; no per-sequence length bias, but the weight of a batch
                               depends on its total token count.
    "seq-mean-token-sum-norm"  Σ_it m_it ℓ_it / (N · max_len)    Dr. GRPO: a constant normaliser
                               (max_len = the configured max completion length, default T), no length
                               bias; usually paired with scale="none". N = the rows, or `rows` when
                               the caller's layout has empty slots (the trainer's packed batch).

Sequence-level ratio (GSPO, Zheng et al. 2025; ratio_level="sequence"): every token of o_i uses

    s_i   = exp( 1/|o_i| Σ_t m_it (logp_it − old_logp_it) )      (the length-normalised sequence ratio)
    S_it  = min(s_i Â_i, clip(s_i, 1 − ε_low, 1 + ε_high) Â_i)

  so a sequence is clipped as a whole; with agg="seq-mean-token-mean" this is GSPO's objective exactly (its
  paper uses ε of a few 1e-4). ratio_level="token" is the ρ_it above.

Off-policy correction for the sampler (rollout correction, as verl and TRL apply it). The sampler's
log-probs μ (sampler_logp) are not exactly π_old: other kernels, other batch shapes, bf16, the slot engine.
With δ_it = old_logp_it − sampler_logp_it over masked tokens:

    drift metrics    sampler_logp_abs_diff = mean |δ_it|,  sampler_kl = mean (e^δ_it − 1 − δ_it)
                     (k3 estimate of KL(μ || π_old) from μ's samples; >= 0 token by token)
    TIS (tis_cap C)  w_it = min(e^δ_it, C), no gradient;  ℓ_it = −(w_it S_it − β KL_it)
                     (truncated importance sampling, Yao et al. 2025 / verl `rollout_is`)
    masking (band)   ρ̄_i = exp( 1/|o_i| Σ_t m_it δ_it ); a row with ρ̄_i outside [lo, hi] is dropped from
                     the loss and its normaliser (m_it = 0), counted as `is_masked_frac`

  With sampler_logp == old_logp (δ = 0, C >= 1, 1 in the band) both are exactly today's loss.

Departures from the paper, stated honestly:
  - eps in the advantage denominator (the paper divides by std alone; a zero-std group would be 0/0).
  - sample std (ddof=1), see above; the std choices "batch"/"none" and the "loo" baseline are variants.
  - "seq-mean-token-mean" averages over non-empty rows only (the paper's 1/G assumes none are empty);
    fully masked rows (e.g. filtered overlong samples) contribute nothing and cause no NaN.
  - masked positions have their log-ratios replaced by 0 before exp, so garbage log-probs at padding can
    neither overflow nor leak NaN gradients; all math is in float32 whatever the input dtype.
  - no dual-clip, no ratio clamping beyond the PPO clip.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ADV_SCALES = ("group", "batch", "none")
ADV_BASELINES = ("mean", "loo")
AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")


def _sample_std(x, axis=None):
    """Bessel-corrected std (ddof=1), the torch.std default."""
    return jnp.std(x, axis=axis, ddof=1)


def group_advantages(rewards, group_size: int, *, scale: str = "group", baseline: str = "mean",
                     eps: float = 1e-6):
    """Outcome advantages for rewards laid out as B consecutive groups of G = group_size.

    rewards: [N] with N = B*G. Returns (advantages [N] float32, metrics) where metrics holds
    reward_mean, reward_std (batch, ddof=1), zero_std_frac (share of groups whose rewards are all equal)
    and advantage_abs_mean.
    """
    if scale not in ADV_SCALES:
        raise ValueError(f"group_advantages: scale={scale!r}; expected one of {ADV_SCALES}")
    if baseline not in ADV_BASELINES:
        raise ValueError(f"group_advantages: baseline={baseline!r}; expected one of {ADV_BASELINES}")
    if rewards.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be [N], got shape {rewards.shape}")
    n = rewards.shape[0]
    if group_size < 2 or n % group_size:
        raise ValueError(f"group_advantages: need group_size >= 2 dividing N; got group_size={group_size}, "
                         f"N={n}")
    r_bg = rewards.astype(jnp.float32).reshape(n // group_size, group_size)  # [B, G]
    mean_b1 = r_bg.mean(axis=1, keepdims=True)
    if baseline == "mean":
        centered_bg = r_bg - mean_b1
    else:
        loo_bg = (r_bg.sum(axis=1, keepdims=True) - r_bg) / (group_size - 1)
        centered_bg = r_bg - loo_bg
    if scale == "group":
        adv_bg = centered_bg / (_sample_std(r_bg, axis=1)[:, None] + eps)
    elif scale == "batch":
        adv_bg = centered_bg / (_sample_std(r_bg) + eps)
    else:
        adv_bg = centered_bg
    zero_std_b = jnp.all(r_bg == r_bg[:, :1], axis=1)  # [B]; exact equality, not a tolerance
    adv_bg = jnp.where(zero_std_b[:, None], 0.0, adv_bg)
    adv_n = adv_bg.reshape(n)
    metrics = {
        "reward_mean": r_bg.mean(),
        "reward_std": _sample_std(r_bg),
        "zero_std_frac": zero_std_b.mean(dtype=jnp.float32),
        "advantage_abs_mean": jnp.abs(adv_n).mean(),
    }
    return adv_n, metrics


def _masked_mean(x, mask_f):
    """Mean of x over mask_f == 1; 0 when the mask is empty."""
    return (x * mask_f).sum() / jnp.maximum(mask_f.sum(), 1.0)


def aggregate_normaliser(mask_nt, agg: str, max_len: int, rows=None):
    """The denominator of the AGG_MODES aggregate over mask_nt [N, T]: masked tokens, non-empty rows or
    N * max_len (at least 1; rows, when given, replaces N: the real rows of a layout with empty slots). The
    aggregate of rows split into parts (gradient accumulation) is the sum of the parts' aggregates, each times
    normaliser(part) / normaliser(all rows), exactly."""
    mask_nt = mask_nt.astype(jnp.float32)
    if agg == "token-mean":
        return jnp.maximum(mask_nt.sum(), 1.0)
    if agg == "seq-mean-token-mean":
        return jnp.maximum((mask_nt.sum(axis=1) > 0).sum(dtype=jnp.float32), 1.0)
    if rows is None:
        return jnp.asarray(mask_nt.shape[0] * max_len, jnp.float32)
    return jnp.maximum(jnp.asarray(rows, jnp.float32) * max_len, 1.0)


def _aggregate(loss_nt, mask_nt, agg: str, max_len: int, rows=None):
    """Reduce per-token values [N, T] to a scalar with one of AGG_MODES (module docstring)."""
    if agg == "seq-mean-token-mean":
        total = ((loss_nt * mask_nt).sum(axis=1) / jnp.maximum(mask_nt.sum(axis=1), 1.0)).sum()
    else:
        total = (loss_nt * mask_nt).sum()
    return total / aggregate_normaliser(mask_nt, agg, max_len, rows)


def _row_mean(x_nt, mask_nt):
    """[N]: the mean of x over each row's masked tokens (0 for an empty row)."""
    return (x_nt * mask_nt).sum(axis=1) / jnp.maximum(mask_nt.sum(axis=1), 1.0)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low: float = 0.2, eps_high: float = 0.2,
                beta: float = 0.04, agg: str = "seq-mean-token-mean", max_len: int | None = None,
                ratio_level: str = "token", sampler_logp=None, tis_cap: float = 0.0,
                is_mask_band: tuple[float, float] | None = None, rows=None):
    """GRPO clipped surrogate + β·k3 KL loss (to minimise) and its metrics.

    logp, old_logp, ref_logp: [N, T] log-probs of the sampled tokens under π_θ, π_old, π_ref
    (ref_logp None skips the KL); advantages: [N]; mask: [N, T] (1 = completion token).
    beta must be a Python number (config, static under jit); beta == 0 skips the KL like ref_logp=None.
    max_len: normaliser of "seq-mean-token-sum-norm" (default T).
    ratio_level: "token" (ρ_it) or "sequence" (GSPO's s_i), module docstring.
    sampler_logp [N, T] (optional): the sampler's log-probs; then the drift metrics are reported, and
    tis_cap > 0 weights tokens by min(π_old/μ, tis_cap), is_mask_band=(lo, hi) drops rows whose geometric
    mean ratio π_old/μ leaves [lo, hi] (module docstring).
    rows (optional scalar): the number of real rows, for "seq-mean-token-sum-norm"'s N when some of the N
    rows are empty slots (mask 0) of a packed layout; the other modes never count an empty row.
    Metrics: pg_loss (the surrogate part, aggregated like the loss), clip_frac, clip_frac_low,
    clip_frac_high (shares of masked tokens where the clipped branch is the strict minimum; low: ρ < 1−ε_low
    with Â < 0, high: ρ > 1+ε_high with Â > 0), ratio_mean (masked), and kl (masked token mean of k3)
    when ref_logp is given.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"policy_loss: agg={agg!r}; expected one of {AGG_MODES}")
    if logp.ndim != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"policy_loss: logp, old_logp, mask must share shape [N, T]; got {logp.shape}, "
                         f"{old_logp.shape}, {mask.shape}")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"policy_loss: ref_logp shape {ref_logp.shape} != logp shape {logp.shape}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"policy_loss: advantages must be [N]={logp.shape[:1]}, got {advantages.shape}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"policy_loss: ratio_level={ratio_level!r}; expected one of {RATIO_LEVELS}")
    if sampler_logp is not None and sampler_logp.shape != logp.shape:
        raise ValueError(f"policy_loss: sampler_logp shape {sampler_logp.shape} != logp shape {logp.shape}")
    if (tis_cap or is_mask_band) and sampler_logp is None:
        raise ValueError("policy_loss: tis_cap / is_mask_band need the sampler's log-probs (sampler_logp)")
    max_len = logp.shape[1] if max_len is None else max_len
    mask_nt = mask.astype(jnp.float32)
    valid_nt = mask_nt > 0
    logp = logp.astype(jnp.float32)
    adv_n1 = advantages.astype(jnp.float32)[:, None]
    metrics = {}

    weight_nt = 1.0
    if sampler_logp is not None:  # off-policy correction for the sampler (module docstring)
        delta_nt = jax.lax.stop_gradient(jnp.where(valid_nt, old_logp.astype(jnp.float32)
                                                   - sampler_logp.astype(jnp.float32), 0.0))
        metrics["sampler_logp_abs_diff"] = _masked_mean(jnp.abs(delta_nt), mask_nt)
        metrics["sampler_kl"] = _masked_mean(jnp.exp(delta_nt) - 1.0 - delta_nt, mask_nt)
        if tis_cap:
            weight_nt = jnp.minimum(jnp.exp(delta_nt), tis_cap)
            metrics["tis_capped_frac"] = _masked_mean((jnp.exp(delta_nt) > tis_cap).astype(jnp.float32), mask_nt)
        if is_mask_band:
            seq_ratio_n = jnp.exp(_row_mean(delta_nt, mask_nt))
            keep_n = (seq_ratio_n >= is_mask_band[0]) & (seq_ratio_n <= is_mask_band[1])
            rows_n = (mask_nt.sum(axis=1) > 0).astype(jnp.float32)
            metrics["is_masked_frac"] = (rows_n * ~keep_n).sum() / jnp.maximum(rows_n.sum(), 1.0)
            mask_nt = mask_nt * keep_n[:, None]

    log_ratio_nt = jnp.where(valid_nt, logp - old_logp.astype(jnp.float32), 0.0)
    if ratio_level == "sequence":  # GSPO: one length-normalised ratio per sequence, on every token
        log_ratio_nt = jnp.broadcast_to(_row_mean(log_ratio_nt, mask.astype(jnp.float32))[:, None], logp.shape)
    ratio_nt = jnp.exp(log_ratio_nt)
    unclipped_nt = ratio_nt * adv_n1
    clipped_nt = jnp.clip(ratio_nt, 1.0 - eps_low, 1.0 + eps_high) * adv_n1
    surrogate_nt = jnp.minimum(unclipped_nt, clipped_nt)
    pg_loss = _aggregate(-weight_nt * surrogate_nt, mask_nt, agg, max_len, rows)
    loss = pg_loss

    metrics |= {
        "pg_loss": pg_loss,
        "clip_frac": _masked_mean((clipped_nt < unclipped_nt).astype(jnp.float32), mask_nt),
        "clip_frac_low": _masked_mean(((ratio_nt < 1.0 - eps_low) & (adv_n1 < 0)).astype(jnp.float32), mask_nt),
        "clip_frac_high": _masked_mean(((ratio_nt > 1.0 + eps_high) & (adv_n1 > 0)).astype(jnp.float32), mask_nt),
        "ratio_mean": _masked_mean(ratio_nt, mask_nt),
    }
    if ref_logp is not None:
        ref_diff_nt = jnp.where(valid_nt, ref_logp.astype(jnp.float32) - logp, 0.0)
        kl_nt = jnp.exp(ref_diff_nt) - ref_diff_nt - 1.0
        metrics["kl"] = _masked_mean(jax.lax.stop_gradient(kl_nt), mask_nt)
        if beta != 0:
            loss = loss + beta * _aggregate(kl_nt, mask_nt, agg, max_len, rows)
    metrics["loss"] = loss
    return loss, metrics


def token_entropy(logits, mask):
    """Mean entropy −Σ_v p log p of the next-token distributions over masked positions.

    logits: [N, T, V] (already divided by the sampling temperature if the caller wants the sampling
    distribution's entropy); mask: [N, T]. Computed in float32; -inf logits (banned tokens) are fine.
    """
    logprobs_ntv = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    probs_ntv = jnp.exp(logprobs_ntv)
    entropy_nt = -jnp.where(probs_ntv > 0, probs_ntv * logprobs_ntv, 0.0).sum(axis=-1)
    return _masked_mean(entropy_nt, mask.astype(jnp.float32))
