"""Hugging Face `config.json` <-> ModelConfig, for DeepseekV3ForCausalLM, Qwen2ForCausalLM and LlamaForCausalLM.

The HF names are the ones in docs/reference.md §1-§2. RoPE parameters come in two spellings: `rope_scaling` +
top-level `rope_theta` (released checkpoints, transformers 4) and `rope_parameters` with `rope_theta` inside
(transformers 5); both are read. Anything the model cannot represent (sliding windows, o_proj / MLP biases,
softmax routing, other RoPE kinds, YaRN `attention_factor` / `truncate: false`) is an error naming the field,
never a silent approximation: an importer that quietly drops a field produces a model that is subtly wrong.

Not read, on purpose: `aux_loss_alpha` / `seq_aux` (training choices, set in the training config; the V3 paper
uses 1e-4, the released config says 1e-3) and dtypes (the loader chooses the parameter dtype).
"""

from __future__ import annotations

from typing import Any

from r1jax.models.config import ModelConfig

DEEPSEEK, QWEN2, LLAMA = "DeepseekV3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"
MODEL_TYPES = {DEEPSEEK: "deepseek_v3", QWEN2: "qwen2", LLAMA: "llama"}
_BY_MODEL_TYPE = {v: k for k, v in MODEL_TYPES.items()}
_MISSING = object()


class HFConfigError(ValueError):
    """A config.json field is missing, unknown or holds a value r1jax cannot represent."""


def _get(hf: dict, key: str, default: Any = _MISSING):
    """hf[key]; `default` when absent or null; an error naming the field when absent and no default is given."""
    value = hf.get(key)
    if value is None:
        if default is _MISSING:
            raise HFConfigError(f"config.json: required field {key!r} is missing")
        return default
    return value


def _require(hf: dict, key: str, allowed, default=None):
    value = hf.get(key, default)
    if value not in allowed:
        raise HFConfigError(f"config.json: field {key!r} = {value!r} is not supported (supported: {list(allowed)})")


def architecture(hf: dict) -> str:
    """The architecture class name, from `architectures` or else `model_type`."""
    archs = hf.get("architectures")
    if archs:
        if len(archs) != 1 or archs[0] not in MODEL_TYPES:
            raise HFConfigError(f"config.json: field 'architectures' = {archs!r} is not supported "
                                f"(supported: {sorted(MODEL_TYPES)})")
        return archs[0]
    model_type = hf.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise HFConfigError(f"config.json: field 'model_type' = {model_type!r} is not supported "
                            f"(supported: {sorted(_BY_MODEL_TYPE)}) and 'architectures' is absent")
    return _BY_MODEL_TYPE[model_type]


# ------------------------------------------------------------------------------------------------ rope

def _rope_from_hf(hf: dict) -> dict:
    """ModelConfig rope fields from `rope_parameters` or `rope_scaling` (+ `rope_theta`)."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    p = dict(hf.get(field) or {})
    out = {"rope_theta": float(p.get("rope_theta", hf.get("rope_theta", 10000.0))),
           "max_position_embeddings": int(_get(hf, "max_position_embeddings"))}
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", "yarn", "llama3"):
        raise HFConfigError(f"config.json: field '{field}.rope_type' = {kind!r} is not supported "
                            "(supported: ['default', 'yarn', 'llama3'])")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFConfigError(f"config.json: field '{field}.partial_rotary_factor' = {p['partial_rotary_factor']!r} "
                            "is not supported (supported: 1.0)")
    out["rope_kind"] = kind
    if kind == "yarn":
        for key, ok in (("attention_factor", (None,)), ("truncate", (None, True))):
            if p.get(key) not in ok:
                raise HFConfigError(f"config.json: field '{field}.{key}' = {p[key]!r} is not supported "
                                    f"(supported: {list(ok)})")
        orig = int(_get(p, "original_max_position_embeddings"))
        factor = p.get("factor") or out["max_position_embeddings"] / orig  # as HF when factor is absent
        out.update(rope_factor=float(factor), rope_original_max_pos=orig,
                   rope_beta_fast=float(p.get("beta_fast") or 32.0), rope_beta_slow=float(p.get("beta_slow") or 1.0),
                   rope_mscale=float(p.get("mscale") or 0.0), rope_mscale_all_dim=float(p.get("mscale_all_dim") or 0.0))
    elif kind == "llama3":
        out.update(rope_factor=float(_get(p, "factor")),
                   rope_original_max_pos=int(_get(p, "original_max_position_embeddings")),
                   rope_low_freq_factor=float(_get(p, "low_freq_factor")),
                   rope_high_freq_factor=float(_get(p, "high_freq_factor")))
    if kind != "yarn" and p.get("mscale_all_dim"):  # HF DeepSeek would still rescale the softmax: not representable
        raise HFConfigError(f"config.json: field '{field}.mscale_all_dim' is only supported with rope_type 'yarn'")
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict | None:
    if cfg.rope_kind == "default":
        return None
    if cfg.rope_kind == "yarn":
        return {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.rope_original_max_pos, "beta_fast": cfg.rope_beta_fast,
                "beta_slow": cfg.rope_beta_slow, "mscale": cfg.rope_mscale, "mscale_all_dim": cfg.rope_mscale_all_dim}
    return {"rope_type": "llama3", "factor": cfg.rope_factor, "original_max_position_embeddings": cfg.rope_original_max_pos,
            "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor}


# ------------------------------------------------------------------------------------------- HF -> ours

def config_from_hf(hf: dict) -> ModelConfig:
    """A ModelConfig from a parsed HF config.json (DeepseekV3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM)."""
    arch = architecture(hf)
    _require(hf, "hidden_act", ("silu",), "silu")
    n_layers = int(_get(hf, "num_hidden_layers"))
    n_heads = int(_get(hf, "num_attention_heads"))
    common = dict(
        vocab_size=int(_get(hf, "vocab_size")), d_model=int(_get(hf, "hidden_size")), n_layers=n_layers,
        d_ff=int(_get(hf, "intermediate_size")), n_heads=n_heads, rms_norm_eps=float(_get(hf, "rms_norm_eps")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_from_hf(hf),
    )
    if arch == DEEPSEEK:
        _require(hf, "attention_bias", (False,), False)
        _require(hf, "scoring_func", ("sigmoid",), "sigmoid")
        _require(hf, "topk_method", ("noaux_tc",), "noaux_tc")
        n_experts = int(hf.get("n_routed_experts") or 0)
        n_dense = min(int(_get(hf, "first_k_dense_replace")), n_layers) if n_experts else n_layers
        return ModelConfig(
            **common, n_dense_layers=n_dense, attention="mla", n_kv_heads=n_heads,
            q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(_get(hf, "kv_lora_rank")),
            qk_nope_head_dim=int(_get(hf, "qk_nope_head_dim")), qk_rope_head_dim=int(_get(hf, "qk_rope_head_dim")),
            v_head_dim=int(_get(hf, "v_head_dim")), n_routed_experts=n_experts,
            n_shared_experts=int(hf.get("n_shared_experts") or 0),
            n_experts_per_tok=int(hf.get("num_experts_per_tok") or 0) if n_experts else 0,
            moe_d_ff=int(hf.get("moe_intermediate_size") or 0) if n_experts else 0,
            n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
            routed_scaling_factor=float(_get(hf, "routed_scaling_factor")),
            norm_topk_prob=bool(_get(hf, "norm_topk_prob")),
            rope_interleave=bool(_get(hf, "rope_interleave", True)),  # HF's DeepseekV3Config default
            mtp_depth=int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0),
        )
    if arch == QWEN2:
        _require(hf, "use_sliding_window", (False,), False)
        kinds = sorted(set(hf.get("layer_types") or ["full_attention"]))
        if kinds != ["full_attention"]:
            raise HFConfigError(f"config.json: field 'layer_types' holds {kinds}; only 'full_attention' is supported")
        qkv_bias = True
    else:
        _require(hf, "attention_bias", (False,), False)
        _require(hf, "mlp_bias", (False,), False)
        qkv_bias = False
    return ModelConfig(
        **common, n_dense_layers=n_layers, attention="gqa", n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or common["d_model"] // n_heads), qkv_bias=qkv_bias, rope_interleave=False,
    )


# ------------------------------------------------------------------------------------------- ours -> HF

def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The HF config.json dict for `cfg`; `dtype` is the dtype the weights are written in."""
    hf: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "rope_theta": cfg.rope_theta, "rope_scaling": _rope_to_hf(cfg),
        "torch_dtype": dtype,
    }
    if cfg.attention == "mla":
        if cfg.rope_kind == "yarn" and cfg.rope_mscale_all_dim and not cfg.mla_softmax_mscale:
            raise HFConfigError("config_to_hf: mla_softmax_mscale=False (official DeepSeek short-context behaviour) "
                                "cannot be expressed in an HF config, which always applies the YaRN softmax mscale")
        arch = DEEPSEEK
        hf.update(
            num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
            n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
            num_experts_per_tok=cfg.n_experts_per_tok, moe_intermediate_size=cfg.moe_d_ff, n_group=cfg.n_group,
            topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
            norm_topk_prob=cfg.norm_topk_prob, first_k_dense_replace=cfg.n_dense_layers,
            num_nextn_predict_layers=cfg.mtp_depth, rope_interleave=cfg.rope_interleave,
            scoring_func="sigmoid", topk_method="noaux_tc", attention_bias=False,
        )
    else:
        if cfg.rope_interleave:
            raise HFConfigError("config_to_hf: rope_interleave=True has no Qwen2/Llama equivalent")
        if cfg.is_moe:
            raise HFConfigError("config_to_hf: a GQA model with MoE layers has no supported HF architecture")
        arch = QWEN2 if cfg.qkv_bias else LLAMA
        hf.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
        if arch == LLAMA:
            hf.update(attention_bias=False, mlp_bias=False)
        else:
            hf.update(use_sliding_window=False)
    hf.update(architectures=[arch], model_type=MODEL_TYPES[arch])
    return hf
