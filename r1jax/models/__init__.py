"""The model: one code path for DeepSeek-V3 (MLA + DeepSeekMoE + MTP) and dense Qwen2/Llama-3 students."""

from r1jax.models.config import PRESETS, ModelConfig, get_preset
from r1jax.models.transformer import (
    ParamSpec,
    abstract_params,
    count_params,
    decode_step,
    forward,
    hidden_states,
    init,
    init_cache,
    param_axes,
    param_shardings,
    param_specs,
    prefill,
    token_logprobs,
    trainable_mask,
    update_router_bias,
)

__all__ = [
    "PRESETS", "ModelConfig", "ParamSpec", "abstract_params", "count_params", "decode_step", "forward", "get_preset", "hidden_states",
    "init", "init_cache", "param_axes", "param_shardings", "param_specs", "prefill", "token_logprobs", "trainable_mask",
    "update_router_bias",
]
