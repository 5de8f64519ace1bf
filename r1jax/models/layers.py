"""Small building blocks: RMSNorm, rotary embeddings (default / YaRN / llama3), SwiGLU.

Numerics: norms and rotary angles are computed in fp32 and cast back to the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.models.config import ModelConfig, yarn_mscale


def rms_norm(x, scale, eps: float):
    """x / sqrt(mean(x^2) + eps) * scale, in fp32 (as HF and the official DeepSeek code)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * xf).astype(x.dtype)


def swiglu(x, w_gate, w_up, w_down):
    """down(silu(x @ gate) * (x @ up)); x [..., D], w_gate/w_up [D, F], w_down [F, D]."""
    h = jax.nn.silu(x @ w_gate) * (x @ w_up)
    return h @ w_down


# ------------------------------------------------------------------------------------------------ rotary

def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [R/2] for the rotary dims, and the cos/sin scale (YaRN's attention factor).

    default: theta^(-2i/R).
    llama3:  long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    yarn:    a linear ramp between the correction dims given by beta_fast/beta_slow blends interpolated (/factor)
             and extrapolated frequencies; cos/sin are scaled by mscale(factor, mscale)/mscale(factor, mscale_all_dim).
    Computed with numpy at trace time: it depends only on the static config.
    """
    dim = cfg.rope_dim
    base = cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_freq = 1.0 / pos_freqs
    if cfg.rope_kind == "default":
        return inv_freq, 1.0
    if cfg.rope_kind == "llama3":
        factor, orig = cfg.rope_factor, cfg.rope_original_max_pos
        low_wavelen = orig / cfg.rope_low_freq_factor
        high_wavelen = orig / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return np.where(mid, blended, out), 1.0
    # YaRN
    factor, orig = cfg.rope_factor, cfg.rope_original_max_pos

    def correction_dim(n_rot):
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        attn_factor = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim)
    else:
        attn_factor = yarn_mscale(factor)
    return inv_freq, attn_factor


def rope_cos_sin(positions, cfg: ModelConfig):
    """cos, sin [B, T, R/2] (fp32) for integer positions [B, T]."""
    inv_freq, attn_factor = rope_inv_freq(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x, cos, sin, interleave: bool):
    """Rotate x [B, T, N, R] by per-position angles (cos/sin [B, T, R/2]).

    interleave=True rotates pairs (x[2i], x[2i+1]) and keeps that layout (DeepSeek's complex-multiply form);
    interleave=False rotates (x[i], x[i + R/2]) (Llama/Qwen `rotate_half`). Both are the same rotation of a
    different pairing of dims, so the weights decide which one a model needs.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(xf.shape)
    else:
        half = xf.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(dtype)
