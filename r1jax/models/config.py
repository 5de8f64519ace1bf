"""ModelConfig: one frozen, hashable config type for DeepSeek-V3 and its dense students.

The same type describes MLA + DeepSeekMoE (DeepSeek-V3/R1) and GQA + SwiGLU (Qwen2/2.5, Llama-3); code
branches on the config's *fields* (attention kind, expert count, rope kind), never on a model's name.
It is passed to jitted functions as a static argument, so it must stay hashable (no lists or dicts).

Presets carry the published hyperparameters (docs/reference.md §1-§2) plus tiny ones for a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp

Remat = Literal["none", "full", "dots", "dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Sizes (dimension letters: V vocab, D model, F dense MLP, L layers).
    vocab_size: int
    d_model: int
    n_layers: int
    d_ff: int  # dense-layer SwiGLU width (HF intermediate_size)
    n_dense_layers: int  # the first k layers are dense (HF first_k_dense_replace); = n_layers for dense models

    # Attention. "mla" = DeepSeek Multi-head Latent Attention, "gqa" = grouped-query attention.
    attention: Literal["mla", "gqa"] = "gqa"
    n_heads: int = 8  # N
    n_kv_heads: int = 8  # K (gqa only)
    head_dim: int = 64  # H (gqa only)
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections (not o)
    q_lora_rank: int = 0  # MLA query compression rank; 0 = plain query projection
    kv_lora_rank: int = 512  # C: the latent cached per token
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # R: one decoupled RoPE key shared by all heads
    v_head_dim: int = 128
    # The official DeepSeek code multiplies the softmax scale by mscale^2 only when the run is longer than the
    # original context; Hugging Face always does when YaRN is configured. Default = HF (for parity).
    mla_softmax_mscale: bool = True
    # Query/key block of the chunked (flash) attention, used when a call's query length exceeds it; 0 = always
    # the dot attention (r1jax/models/attention.py). Same values and gradients; memory O(block^2), not O(T S).
    attn_block: int = 0
    # Key block of a decode step over the cache (attention.blocked_cache_attention): the step reads a prefix of
    # whole blocks of this many cache positions, the shortest that holds the farthest row, so a batch of short
    # rows skips the cache's empty tail; 0 = read the whole cache. Each prefix width is a branch of a lax.switch
    # (at most attention.MAX_DECODE_WIDTHS: a 32k cache in blocks of 1024 steps by 3 blocks); the tiny presets'
    # caches of a few hundred positions use 32.
    decode_block: int = 1024
    # Runs of rows that decode attention reads separately (attention.blocked_cache_attention): the rows sorted by
    # length and cut into this many runs, each reading the prefix its own longest row needs, so the slot engine's
    # short rows do not read as far as its longest. 1 = the batch's longest for all; a batch of fewer than
    # attention.MIN_RUN_ROWS rows per run gets fewer runs. It gathers rows across the batch: for a batch on one
    # device (the tiny presets); at scale a per-row ragged kernel is the way.
    decode_row_groups: int = 1
    # Positions per chunk of the output head + log-softmax in training and scoring (transformer.token_logprobs):
    # the fp32 logits [B,T,V] are never whole (2 GiB per row at T = 32k, V / 8); 0 = all at once.
    logits_chunk: int = 0

    # MoE (DeepSeekMoE). n_routed_experts = 0 means a dense model.
    n_routed_experts: int = 0  # E
    n_shared_experts: int = 0
    n_experts_per_tok: int = 0  # top-k
    moe_d_ff: int = 0  # width of each routed / shared expert
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3 paper: 1e-4); 0 = off
    bias_update_rate: float = 0.0  # gamma of the aux-loss-free bias update; 0 = frozen (post-training)
    # grouped matmul: auto (gmm on TPU, ragged_dot on GPU, tiled on CPU) | gmm | ragged_dot | tiled; gmm = the
    # Pallas megablox kernels (r1jax/models/gmm.py), in interpret mode off TPU (tests)
    moe_impl: str = "auto"
    moe_tile: int = 128  # largest row tile of the tiled path
    moe_gmm_tiling: tuple[int, int, int] = ()  # gmm's (Tm, Tk, Tn); () = gmm.TILING for the target chip

    # Norms, RoPE.
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_kind: Literal["default", "yarn", "llama3"] = "default"
    rope_interleave: bool = False  # DeepSeek rotates interleaved pairs; Llama/Qwen rotate halves
    rope_factor: float = 1.0
    rope_original_max_pos: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    max_position_embeddings: int = 4096

    tie_embeddings: bool = False
    mtp_depth: int = 0  # multi-token prediction modules (V3: 1); 0 = off
    mtp_loss_weight: float = 0.3  # V3: 0.3 early in pre-training, 0.1 later

    # Numerics and compilation.
    dtype: str = "float32"  # compute dtype of activations/matmuls
    param_dtype: str = "float32"  # master weights
    remat: Remat = "none"
    init_std: float = 0.02

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")

        need(0 <= self.n_dense_layers <= self.n_layers, f"n_dense_layers={self.n_dense_layers} not in [0, n_layers={self.n_layers}]")
        need(self.attention in ("mla", "gqa"), f"attention must be 'mla' or 'gqa', got {self.attention!r}")
        need(self.rope_kind in ("default", "yarn", "llama3"), f"unknown rope_kind {self.rope_kind!r}")
        need(self.remat in ("none", "full", "dots", "dots_no_batch"), f"unknown remat {self.remat!r}")
        need(self.attn_block >= 0, f"attn_block={self.attn_block} must be >= 0 (0 = dot attention)")
        need(self.decode_row_groups >= 1, f"decode_row_groups={self.decode_row_groups} must be >= 1")
        need(self.decode_block >= 0, f"decode_block={self.decode_block} must be >= 0 (0 = the whole cache)")
        need(self.logits_chunk >= 0, f"logits_chunk={self.logits_chunk} must be >= 0 (0 = all positions at once)")
        if self.attention == "gqa":
            need(self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} not a multiple of n_kv_heads={self.n_kv_heads}")
            need(self.head_dim % 2 == 0, "head_dim must be even for RoPE")
        else:
            need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even for RoPE")
        if self.n_dense_layers < self.n_layers:
            need(self.n_routed_experts > 0, "MoE layers requested (n_dense_layers < n_layers) but n_routed_experts == 0")
            need(0 < self.n_experts_per_tok <= self.n_routed_experts, "need 0 < n_experts_per_tok <= n_routed_experts")
            need(self.n_routed_experts % self.n_group == 0, f"n_routed_experts={self.n_routed_experts} not divisible by n_group={self.n_group}")
            need(0 < self.topk_group <= self.n_group, "need 0 < topk_group <= n_group")
            need(self.topk_group * (self.n_routed_experts // self.n_group) >= self.n_experts_per_tok,
                 "topk_group groups hold fewer experts than n_experts_per_tok")
            need(self.moe_d_ff > 0, "moe_d_ff must be > 0 for MoE layers")
        need(self.moe_impl in ("auto", "gmm", "ragged_dot", "tiled"), f"unknown moe_impl {self.moe_impl!r}")
        object.__setattr__(self, "moe_gmm_tiling", tuple(self.moe_gmm_tiling))  # a list from a config file
        need(self.moe_gmm_tiling == () or (len(self.moe_gmm_tiling) == 3 and self.moe_gmm_tiling[0] % 8 == 0
                                           and min(self.moe_gmm_tiling) > 0),
             f"moe_gmm_tiling={self.moe_gmm_tiling} must be () or (Tm, Tk, Tn) > 0 with Tm a multiple of 8")
        need(self.mtp_depth in (0, 1), f"mtp_depth must be 0 or 1, got {self.mtp_depth}")

    # Derived sizes.
    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def is_moe(self) -> bool:
        return self.n_moe_layers > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def cache_values_per_token(self) -> int:
        """Values cached per token per layer: the MLA latent (C + R) or GQA's K and V heads."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def softmax_scale(self) -> float:
        head = self.qk_head_dim if self.attention == "mla" else self.head_dim
        scale = head ** -0.5
        if self.attention == "mla" and self.rope_kind == "yarn" and self.mla_softmax_mscale and self.rope_mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1 (docs/reference.md §1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ----------------------------------------------------------------------------------------------- presets

def _deepseek_v3_671b() -> ModelConfig:
    return ModelConfig(
        vocab_size=129280, d_model=7168, n_layers=61, d_ff=18432, n_dense_layers=3,
        attention="mla", n_heads=128, n_kv_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, n_experts_per_tok=8, moe_d_ff=2048,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        aux_loss_alpha=1e-4, bias_update_rate=0.0,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_kind="yarn", rope_interleave=True, rope_factor=40.0,
        rope_original_max_pos=4096, rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=1.0,
        rope_mscale_all_dim=1.0, max_position_embeddings=163840, tie_embeddings=False,
        mtp_depth=1, mtp_loss_weight=0.1, dtype="bfloat16", param_dtype="float32", remat="full", attn_block=2048,
        logits_chunk=4096,
    )


def _qwen25(d, f, layers, heads, kv, vocab, tie, theta=1e6, max_pos=32768) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, d_model=d, n_layers=layers, d_ff=f, n_dense_layers=layers, attention="gqa",
        n_heads=heads, n_kv_heads=kv, head_dim=d // heads, qkv_bias=True, rms_norm_eps=1e-6,
        rope_theta=theta, max_position_embeddings=max_pos, tie_embeddings=tie,
        dtype="bfloat16", param_dtype="float32", remat="full", attn_block=2048,
        logits_chunk=4096,
    )


def _llama3(d, f, layers, heads, kv) -> ModelConfig:
    return ModelConfig(
        vocab_size=128256, d_model=d, n_layers=layers, d_ff=f, n_dense_layers=layers, attention="gqa",
        n_heads=heads, n_kv_heads=kv, head_dim=d // heads, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_kind="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_max_pos=8192, max_position_embeddings=131072,
        dtype="bfloat16", param_dtype="float32", remat="full", attn_block=2048,
        logits_chunk=4096,
    )


PRESETS = {
    "deepseek_v3_671b": _deepseek_v3_671b,
    # R1's distillation students (docs/reference.md §2).
    "qwen2.5_math_1.5b": lambda: _qwen25(1536, 8960, 28, 12, 2, 151936, True, theta=10000.0, max_pos=4096),
    "qwen2.5_math_7b": lambda: _qwen25(3584, 18944, 28, 28, 4, 152064, False, theta=10000.0, max_pos=4096),
    "qwen2.5_14b": lambda: _qwen25(5120, 13824, 48, 40, 8, 152064, False),
    "qwen2.5_32b": lambda: _qwen25(5120, 27648, 64, 40, 8, 152064, False),
    "llama3.1_8b": lambda: _llama3(4096, 14336, 32, 32, 8),
    "llama3.3_70b": lambda: _llama3(8192, 28672, 80, 64, 8),
    # Tiny models for a 2-core CPU: same code paths, small widths.
    "tiny_moe": lambda: ModelConfig(
        vocab_size=512, d_model=64, n_layers=4, d_ff=128, n_dense_layers=1, attention="mla", n_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, n_experts_per_tok=2, moe_d_ff=32, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, rope_interleave=True, max_position_embeddings=512, mtp_depth=1, decode_block=32,
        decode_row_groups=2,
    ),
    "tiny_dense": lambda: ModelConfig(
        vocab_size=512, d_model=64, n_layers=4, d_ff=128, n_dense_layers=4, attention="gqa", n_heads=4,
        n_kv_heads=2, head_dim=16, qkv_bias=True, max_position_embeddings=512, decode_block=32,
        decode_row_groups=2,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides (e.g. `get_preset("tiny_moe", n_layers=61)`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    bad = [k for k in overrides if k not in {f.name for f in dataclasses.fields(ModelConfig)}]
    if bad:
        raise KeyError(f"unknown ModelConfig field(s) {bad} in overrides for preset {name!r}")
    return cfg.replace(**overrides)
