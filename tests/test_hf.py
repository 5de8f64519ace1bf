"""r1jax.hf against `transformers`: logit parity (fp32, max |Δlogit| <= 1e-4) for DeepSeek-V3 (MLA, group-limited
sigmoid routing with a selection bias, YaRN), Qwen2 (qkv bias, tied and untied) and Llama-3 (llama3 RoPE); FP8
block dequantisation against an independent numpy loop; save -> transformers round trips; sharded (with and
without index), fused and per-expert layouts; the MTP layer; error messages; shard-local (streaming) reads.
Real-checkpoint path: Hub ids resolved through a local Hugging Face cache (offline, a clear error when absent), and
`python -m r1jax.hf` exporting a training run (and converting HF -> HF) into a directory transformers loads with
the source's tokenizer, chat template and EOS ids, on the Qwen2 / Llama-3 checkpoints of tests/hf_fixtures.py.

Every HF model is tiny and random (torch.manual_seed), with every weight re-drawn: transformers initialises
norms to 1, biases and the router's selection bias to 0, which would hide transposition and selection bugs.
Sequences (24) are longer than original_max_position_embeddings (16), so YaRN / llama3 scaling matters.
"""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from hf_fixtures import hf_checkpoints, randomise  # noqa: E402, F401 (fixture)
from r1jax import hf as H  # noqa: E402
from r1jax import models as M  # noqa: E402
from r1jax.hf import fp8 as F  # noqa: E402
from r1jax.hf import layout as L  # noqa: E402
from r1jax.hf.safetensors_io import SafetensorsDir  # noqa: E402
from r1jax.sharding import DEFAULT_RULES, make_mesh  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 24))
FP8_BLOCK = (16, 32)  # non-square and not dividing 40 / 72 / 24: partial edge blocks in both directions
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
DEEPSEEK = dict(
    vocab_size=128, hidden_size=64, intermediate_size=72, moe_intermediate_size=24, num_hidden_layers=4,
    first_k_dense_replace=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=64,
    rope_theta=10000.0, rope_scaling=YARN,
)
DENSE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _build(kind: str, tied: bool):
    if kind == "deepseek_v3":
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**DEEPSEEK, attn_implementation="eager"))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DENSE, tie_word_embeddings=tied,
                                                                       attn_implementation="eager"))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DENSE, head_dim=16, rope_scaling=LLAMA3,
                                                                       attn_implementation="eager"))
    return randomise(model)


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda p, t: M.forward(p, t, cfg)[0])


def _logits(cfg, params) -> np.ndarray:
    return np.asarray(_forward(cfg)(params, jnp.asarray(TOKENS)))


def _assert_same_params(a, b):
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _assert_blocks_match(path, cfg, params, fused=False):
    """Random sub-blocks of every leaf, read as one shard's callback reads them, equal that slice of the full
    load (the FP8 edge offsets and head / expert splits are only exercised by partial blocks)."""
    with open(os.path.join(path, "config.json")) as f:
        block = F.block_size(json.load(f))
    reader = SafetensorsDir(path)
    rng = np.random.default_rng(0)
    for leaf, x in zip(L.hf_layout(cfg, fused_experts=fused)[0], jax.tree.leaves(params)):
        for _ in range(3):
            ranges = [tuple(sorted(rng.choice(n + 1, 2, replace=False))) for n in leaf.shape]
            got = L.leaf_block(leaf, ranges, lambda t, r: F.read_float32(reader, t.name, r, block))
            want = np.asarray(x)[tuple(slice(a, b) for a, b in ranges)]
            np.testing.assert_array_equal(got, want, err_msg=f"{leaf.label} {ranges}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """ckpt(kind, tied) -> (dir written by save_pretrained, the torch model, its logits on TOKENS)."""
    cache = {}

    def get(kind="deepseek_v3", tied=False):
        if (kind, tied) not in cache:
            model = _build(kind, tied)
            path = str(tmp_path_factory.mktemp(f"{kind}_{'tied' if tied else 'untied'}"))
            model.save_pretrained(path, safe_serialization=True)
            cache[kind, tied] = (path, model, _hf_logits(model))
        return cache[kind, tied]

    return get


def _write(path, tensors: dict, hf_config: dict):
    """A single-file checkpoint from torch tensors (any dtype, fp8 included) and a config dict."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f)
    return str(path)


def _read(path):
    with open(os.path.join(path, "config.json")) as f:
        return load_file(os.path.join(path, "model.safetensors")), json.load(f)


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("kind,tied", [("deepseek_v3", False), ("qwen2", True), ("qwen2", False), ("llama", False)])
def test_logit_parity_and_transformers_round_trip(ckpt, tmp_path, kind, tied):
    """HF checkpoint -> our loader -> our forward == transformers; our writer -> transformers == the original."""
    path, model, ref = ckpt(kind, tied)
    cfg, params = H.load_hf_checkpoint(path)
    assert np.abs(_logits(cfg, params) - ref).max() <= TOL

    out = str(tmp_path / "saved")
    H.save_hf_checkpoint(out, cfg, params)
    back, info = type(model).from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert np.abs(_hf_logits(back.eval()) - ref).max() <= TOL
    cfg2, params2 = H.load_hf_checkpoint(out)
    assert cfg2 == cfg
    _assert_same_params(params2, params)


def test_deepseek_config_and_selection_bias(ckpt):
    """The tiny V3 maps field by field, and the loaded selection bias is exactly HF's and changes the routing."""
    path, model, ref = ckpt("deepseek_v3")
    cfg, params = H.load_hf_checkpoint(path)
    assert (cfg.attention, cfg.n_dense_layers, cfg.n_moe_layers, cfg.q_lora_rank, cfg.n_group, cfg.topk_group) == (
        "mla", 2, 2, 32, 4, 2)
    assert (cfg.rope_kind, cfg.rope_factor, cfg.rope_original_max_pos, cfg.rope_interleave) == ("yarn", 4.0, 16, True)
    assert cfg.mtp_depth == 0  # config.json says 1, but transformers wrote no MTP tensors
    for i in (2, 3):
        hf_bias = model.model.layers[i].mlp.gate.e_score_correction_bias.numpy()
        np.testing.assert_array_equal(np.asarray(params["moe"]["mlp"]["router_bias"][i - 2]), hf_bias)
    mlp = {**params["moe"]["mlp"], "router_bias": jnp.zeros_like(params["moe"]["mlp"]["router_bias"])}
    unbiased = {**params, "moe": {**params["moe"], "mlp": mlp}}
    assert np.abs(_logits(cfg, unbiased) - ref).max() > 1e-2


# --------------------------------------------------------------------------------------------------- FP8

def _quantise(w: torch.Tensor, block):
    """Per-block absmax scaling to float8_e4m3fn, as DeepSeek-V3 stores its weights: W ≈ q * scale_inv."""
    (b0, b1), (rows, cols) = block, w.shape
    scale = torch.zeros(-(-rows // b0), -(-cols // b1))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
            scale[i, j] = blk.abs().max() / 448.0
            q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def _dequantise(q: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
    """Independent reference: an explicit loop over the blocks."""
    w = q.astype(np.float32)
    b0, b1 = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] *= scale[i, j]
    return w


def test_fp8_checkpoint_dequantises_blockwise(ckpt, tmp_path):
    path, _, _ = ckpt("deepseek_v3")
    tensors, hf_config = _read(path)
    fp8, dequant = {}, {}
    for name, w in tensors.items():
        if re.search(r"_proj(_with_mqa)?\.weight$", name):  # every Linear but the router, as in the V3 release
            q, s = _quantise(w, FP8_BLOCK)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            dequant[name] = torch.from_numpy(_dequantise(q.float().numpy(), s.numpy(), FP8_BLOCK))
        else:
            fp8[name] = dequant[name] = w
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(FP8_BLOCK)}
    fp8_dir = _write(tmp_path / "fp8", fp8, {**hf_config, "quantization_config": quant})
    ref_dir = _write(tmp_path / "ref", dequant, hf_config)

    cfg, params = H.load_hf_checkpoint(fp8_dir)
    cfg_ref, params_ref = H.load_hf_checkpoint(ref_dir)
    _assert_same_params(params, params_ref)
    _assert_blocks_match(fp8_dir, cfg, params_ref)
    assert np.abs(_logits(cfg, params) - _logits(cfg_ref, params_ref)).max() <= TOL
    # The checkpoint really was quantised: FP8 weights differ from the originals, by a quantisation-sized amount.
    _, original = H.load_hf_checkpoint(path)
    err = np.abs(np.asarray(params["dense"]["mlp"]["w_gate"]) - np.asarray(original["dense"]["mlp"]["w_gate"]))
    assert 0 < err.max() < 0.1 * np.abs(np.asarray(original["dense"]["mlp"]["w_gate"])).max()

    # The block size is read from config.json: a different one no longer fits the stored scales.
    with open(os.path.join(fp8_dir, "config.json"), "w") as f:
        json.dump({**hf_config, "quantization_config": {**quant, "weight_block_size": [32, 32]}}, f)
    with pytest.raises(H.CheckpointError, match=r"_scale_inv.*weight_block_size \[32, 32\]"):
        H.load_hf_checkpoint(fp8_dir)


# ---------------------------------------------------------------------------------------------- layouts

def test_sharded_with_and_without_index_and_fused_experts(ckpt, tmp_path):
    path, model, ref = ckpt("deepseek_v3")
    cfg, params = H.load_hf_checkpoint(path)

    sharded = str(tmp_path / "sharded")
    files = H.save_hf_checkpoint(sharded, cfg, params, max_shard_bytes=64 * 1024)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    back = type(model).from_pretrained(sharded, attn_implementation="eager")
    assert np.abs(_hf_logits(back.eval()) - ref).max() <= TOL
    _assert_same_params(H.load_hf_checkpoint(sharded)[1], params)
    os.remove(os.path.join(sharded, "model.safetensors.index.json"))  # now every *.safetensors is scanned
    _assert_same_params(H.load_hf_checkpoint(sharded)[1], params)

    # transformers 5 keeps experts fused in memory: [E, 2F, D] gate rows then up rows, and [E, D, F].
    state = model.state_dict()
    assert state["model.layers.2.mlp.experts.gate_up_proj"].shape == (8, 48, 64)
    fused = _write(tmp_path / "fused", state, _read(path)[1])
    _assert_same_params(H.load_hf_checkpoint(fused)[1], params)
    _assert_blocks_match(fused, cfg, params, fused=True)


def test_bf16_save(ckpt, tmp_path):
    """bf16 weights (the selection bias stays fp32) that load back to the bf16-rounded values."""
    path, _, _ = ckpt("deepseek_v3")
    cfg, params = H.load_hf_checkpoint(path)
    out = str(tmp_path / "bf16")
    H.save_hf_checkpoint(out, cfg, params, dtype="bfloat16")
    reader = SafetensorsDir(out)
    assert reader.info("model.layers.2.mlp.experts.0.up_proj.weight").dtype == jnp.bfloat16
    assert reader.info("model.layers.2.mlp.gate.e_score_correction_bias").dtype == np.float32
    cfg16, params16 = H.load_hf_checkpoint(out, dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    w = params["moe"]["mlp"]["w_up"]
    np.testing.assert_array_equal(np.asarray(params16["moe"]["mlp"]["w_up"]), np.asarray(w.astype(jnp.bfloat16)))


def test_mtp_layer_loaded_and_saved(ckpt, tmp_path):
    """transformers drops layer num_hidden_layers (the MTP module); we read it, place it, and write it back."""
    path, model, ref = ckpt("deepseek_v3")
    tensors, hf_config = _read(path)
    assert hf_config["num_nextn_predict_layers"] == 1
    rng = np.random.default_rng(1)
    pre = "model.layers.4."
    mtp = {pre + k[len("model.layers.3."):]: torch.from_numpy(rng.normal(size=tuple(v.shape)).astype(np.float32))
           for k, v in tensors.items() if k.startswith("model.layers.3.")}  # an MoE block, as layer 61 of V3
    for name, shape in (("enorm.weight", (64,)), ("hnorm.weight", (64,)), ("eh_proj.weight", (64, 128)),
                        ("shared_head.norm.weight", (64,))):
        mtp[pre + name] = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    mtp[pre + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[pre + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    src = _write(tmp_path / "with_mtp", {**tensors, **mtp}, hf_config)

    cfg, params = H.load_hf_checkpoint(src)
    assert cfg.mtp_depth == 1
    p, t = params["mtp"], {k: v.numpy() for k, v in mtp.items()}
    eq = np.testing.assert_array_equal
    eq(np.asarray(p["enorm"]), t[pre + "enorm.weight"])
    eq(np.asarray(p["hnorm"]), t[pre + "hnorm.weight"])
    eq(np.asarray(p["eh_proj"]), t[pre + "eh_proj.weight"].T)
    eq(np.asarray(p["norm"]), t[pre + "shared_head.norm.weight"])
    eq(np.asarray(p["block"]["attn_norm"]), t[pre + "input_layernorm.weight"])
    eq(np.asarray(p["block"]["attn"]["wq_b"]), t[pre + "self_attn.q_b_proj.weight"].T.reshape(32, 4, 24))
    eq(np.asarray(p["block"]["attn"]["wo"]), t[pre + "self_attn.o_proj.weight"].T.reshape(4, 16, 64))
    eq(np.asarray(p["block"]["mlp"]["router_bias"]), t[pre + "mlp.gate.e_score_correction_bias"])
    eq(np.asarray(p["block"]["mlp"]["w_gate"][5]), t[pre + "mlp.experts.5.gate_proj.weight"].T)
    eq(np.asarray(p["block"]["mlp"]["shared"]["w_down"]), t[pre + "mlp.shared_experts.down_proj.weight"].T)
    _assert_same_params({k: v for k, v in params.items() if k != "mtp"}, H.load_hf_checkpoint(path)[1])

    skipped_cfg, skipped = H.load_hf_checkpoint(src, mtp=False)
    assert skipped_cfg.mtp_depth == 0 and "mtp" not in skipped
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({**hf_config, "num_nextn_predict_layers": 0}, f)
    with pytest.raises(H.CheckpointError, match=r"model\.layers\.4\."):  # layer 4 is unannounced: leftovers
        H.load_hf_checkpoint(src)

    out = str(tmp_path / "saved")
    H.save_hf_checkpoint(out, cfg, params)
    saved = SafetensorsDir(out)
    for name, value in t.items():  # every MTP tensor, including the embedding / head copies, written back exactly
        eq(saved.read(name), value)
    _assert_same_params(H.load_hf_checkpoint(out)[1], params)
    back = type(model).from_pretrained(out, attn_implementation="eager")  # transformers skips the MTP layer
    assert np.abs(_hf_logits(back.eval()) - ref).max() <= TOL


# ----------------------------------------------------------------------------------------------- errors

def _broken(ckpt_dir, dst, edit_tensors=None, edit_config=None):
    tensors, hf_config = _read(ckpt_dir)
    if edit_tensors:
        edit_tensors(tensors)
    return _write(dst, tensors, edit_config(hf_config) if edit_config else hf_config)


def test_bad_checkpoints_name_the_tensor_or_field(ckpt, tmp_path):
    path, _, _ = ckpt("deepseek_v3")
    expert = "model.layers.3.mlp.experts.5.up_proj.weight"
    bad = _broken(path, tmp_path / "missing", lambda t: t.pop(expert))
    with pytest.raises(H.CheckpointError, match=re.escape(f"{expert!r} (for parameter moe/mlp/w_up[1, 5])")):
        H.load_hf_checkpoint(bad)

    kv_b = "model.layers.0.self_attn.kv_b_proj.weight"
    bad = _broken(path, tmp_path / "shape", lambda t: t.update({kv_b: torch.zeros(120, 32)}))
    with pytest.raises(H.CheckpointError, match=re.escape(kv_b) + r".*shape \(120, 32\), expected \(128, 32\)"):
        H.load_hf_checkpoint(bad)

    bad = _broken(path, tmp_path / "arch", edit_config=lambda c: {**c, "architectures": ["MistralForCausalLM"]})
    with pytest.raises(H.HFConfigError, match=r"'architectures'.*MistralForCausalLM"):
        H.load_hf_checkpoint(bad)

    extra = "model.layers.1.self_attn.extra_proj.weight"
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    bad = _broken(path, tmp_path / "extra", lambda t: t.update({extra: torch.zeros(2, 2), inv_freq: torch.ones(4)}))
    with pytest.raises(H.CheckpointError, match=r"1 tensor\(s\) map to no parameter.*" + re.escape(extra)):
        H.load_hf_checkpoint(bad)  # inv_freq is a known extra, ignored by default
    H.load_hf_checkpoint(bad, ignore=[r"rotary_emb\.inv_freq$", r"\.extra_proj\."])


@pytest.mark.parametrize("edit,match", [
    (lambda c: {k: v for k, v in c.items() if k != "architectures"} | {"model_type": "gpt2"}, r"'model_type'.*gpt2"),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, r"'hidden_size' is missing"),
    (lambda c: {**c, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"'rope_scaling.rope_type' = 'dynamic'"),
    (lambda c: {**c, "scoring_func": "softmax"}, r"'scoring_func' = 'softmax'"),
    (lambda c: {**c, "rope_scaling": {**YARN, "attention_factor": 0.5}}, r"'rope_scaling.attention_factor'"),
])
def test_unsupported_configs_name_the_field(edit, match):
    base = H.config_to_hf(H.config_from_hf({**DEEPSEEK, "architectures": ["DeepseekV3ForCausalLM"],
                                             "rms_norm_eps": 1e-6, "norm_topk_prob": True}))
    with pytest.raises(H.HFConfigError, match=match):
        H.config_from_hf(edit(base))


# ----------------------------------------------------------------------------------------------- config

ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "d_ff", "n_dense_layers", "attention", "n_heads", "qkv_bias",
               "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
               "n_routed_experts", "n_shared_experts", "n_experts_per_tok", "moe_d_ff", "n_group", "topk_group",
               "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps", "rope_theta", "rope_kind",
               "rope_interleave", "rope_factor", "rope_original_max_pos", "rope_beta_fast", "rope_beta_slow",
               "rope_mscale", "rope_mscale_all_dim", "rope_low_freq_factor", "rope_high_freq_factor",
               "max_position_embeddings", "tie_embeddings", "mtp_depth")


def _arch(cfg):
    gqa = ("n_kv_heads", "head_dim") if cfg.attention == "gqa" else ()
    return {f: getattr(cfg, f) for f in ARCH_FIELDS + gqa}


@pytest.mark.parametrize("preset", ["deepseek_v3_671b", "qwen2.5_math_1.5b", "qwen2.5_14b", "llama3.1_8b"])
def test_config_round_trip(preset):
    cfg = M.get_preset(preset)
    hf = H.config_to_hf(cfg)
    assert _arch(H.config_from_hf(hf)) == _arch(cfg)
    # transformers 5 spelling: rope parameters (theta included) under `rope_parameters`
    rope = {**(hf.pop("rope_scaling") or {"rope_type": "default"}), "rope_theta": hf.pop("rope_theta")}
    assert _arch(H.config_from_hf({**hf, "rope_parameters": rope})) == _arch(cfg)


def test_released_deepseek_v3_config():
    """The released config.json (docs/reference.md §1; rope_scaling spelling, no rope_interleave) is the 671B preset."""
    released = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
        "rope_theta": 10000, "attention_bias": False, "torch_dtype": "bfloat16",
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }
    assert _arch(H.config_from_hf(released)) == _arch(M.get_preset("deepseek_v3_671b"))


# -------------------------------------------------------------------------------------------- streaming

def test_shard_reads_touch_only_their_slice(ckpt):
    """A block of a leaf is cut from covering blocks of exactly the HF tensors it needs."""
    path, model, _ = ckpt("deepseek_v3")
    cfg, params = H.load_hf_checkpoint(path)
    reader, reads = SafetensorsDir(path), []

    def read(t, ranges):
        reads.append((t.name, tuple(ranges)))
        return reader.read(t.name, ranges).astype(np.float32)

    leaves = {leaf.path: leaf for leaf in L.hf_layout(cfg)[0]}
    # MoE layer 1 (HF layer 3), experts 2:4, model rows 8:40 of w_up [L, E, D, F]
    block = L.leaf_block(leaves["moe", "mlp", "w_up"], [(1, 2), (2, 4), (8, 40), (0, 24)], read)
    np.testing.assert_array_equal(block, np.asarray(params["moe"]["mlp"]["w_up"])[1:2, 2:4, 8:40])
    assert reads == [(f"model.layers.3.mlp.experts.{j}.up_proj.weight", ((0, 24), (8, 40))) for j in (2, 3)]
    # heads 1:3 of wq_b [L, Q, N, Dn+R] are rows 24:72 of q_b_proj [N*(Dn+R), Q]
    reads.clear()
    block = L.leaf_block(leaves["dense", "attn", "wq_b"], [(1, 2), (0, 32), (1, 3), (0, 24)], read)
    np.testing.assert_array_equal(block, np.asarray(params["dense"]["attn"]["wq_b"])[1:2, :, 1:3])
    assert reads == [("model.layers.1.self_attn.q_b_proj.weight", ((24, 72), (0, 32)))]
    # heads 2:4 of wo [L, N, Dv, D] are columns 32:64 of o_proj [D, N*Dv]
    reads.clear()
    block = L.leaf_block(leaves["moe", "attn", "wo"], [(0, 1), (2, 4), (0, 16), (0, 64)], read)
    np.testing.assert_array_equal(block, np.asarray(params["moe"]["attn"]["wo"])[0:1, 2:4])
    assert reads == [("model.layers.2.self_attn.o_proj.weight", ((0, 64), (32, 64)))]

    # fused [E, 2F, D]: experts 2:4 of the up half (rows F:2F), model rows 8:40
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    reads.clear()

    def read_fused(t, ranges):
        reads.append((t.name, tuple(ranges)))
        return state[t.name][tuple(slice(a, b) for a, b in ranges)]

    fused = {leaf.path: leaf for leaf in L.hf_layout(cfg, fused_experts=True)[0]}
    block = L.leaf_block(fused["moe", "mlp", "w_up"], [(1, 2), (2, 4), (8, 40), (0, 24)], read_fused)
    np.testing.assert_array_equal(block, np.asarray(params["moe"]["mlp"]["w_up"])[1:2, 2:4, 8:40])
    assert reads == [("model.layers.3.mlp.experts.gate_up_proj", ((2, 4), (24, 48), (8, 40)))]


def test_load_onto_a_mesh(ckpt):
    path, _, _ = ckpt("deepseek_v3")
    mesh = make_mesh({"fsdp": -1})
    cfg, params = H.load_hf_checkpoint(path, mesh=mesh)
    want = M.param_shardings(cfg, mesh, DEFAULT_RULES)
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert x.sharding == s
    _assert_same_params(params, H.load_hf_checkpoint(path)[1])


def test_load_sharded_over_8_fake_devices(ckpt):
    """In a fresh process with 8 CPU devices: every shard holds exactly its slice of the single-device load."""
    path, _, _ = ckpt("deepseek_v3")
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from r1jax.hf import load_hf_checkpoint
        from r1jax.sharding import make_mesh
        assert len(jax.devices()) == 8
        _, full = load_hf_checkpoint({path!r})
        _, sharded = load_hf_checkpoint({path!r}, mesh=make_mesh({{"fsdp": 2, "expert": 2, "tensor": 2}}))
        w = sharded["moe"]["mlp"]["w_gate"]  # [L, E, D, F] over (-, expert, fsdp, tensor)
        assert w.sharding.shard_shape(w.shape) == (2, 4, 32, 12), w.sharding
        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(sharded)):
            a = np.asarray(a)
            for shard in b.addressable_shards:
                assert np.array_equal(np.asarray(shard.data), a[shard.index])
        print("ok")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_save_refuses_to_mix_with_stale_shards(ckpt, tmp_path):
    path, _, _ = ckpt("qwen2", True)
    cfg, params = H.load_hf_checkpoint(path)
    out = str(tmp_path / "out")
    H.save_hf_checkpoint(out, cfg, params, max_shard_bytes=16 * 1024)
    with pytest.raises(H.CheckpointError, match="model-00001-of-"):
        H.save_hf_checkpoint(out, cfg, params)  # one file now: the old shards would be mixed in on load
    shutil.rmtree(out)
    H.save_hf_checkpoint(out, cfg, params)


# ------------------------------------------------------------------------------ Hub ids and export of runs

def test_hub_id_resolves_through_the_local_cache_only(hf_checkpoints, tmp_path, monkeypatch):  # noqa: F811
    """A fake HF_HOME laid out as huggingface_hub lays out its cache: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--Qwen--Qwen2.5-Math-1.5B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(hf_checkpoints("qwen2"), repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any network attempt would raise instead of hanging
    monkeypatch.chdir(tmp_path)
    snapshot = str(repo / "snapshots" / commit)
    assert H.resolve_checkpoint("Qwen/Qwen2.5-Math-1.5B") == snapshot
    assert H.resolve_checkpoint(f"Qwen/Qwen2.5-Math-1.5B@{commit}") == snapshot
    assert H.resolve_checkpoint(hf_checkpoints("llama3")) == hf_checkpoints("llama3")  # a directory is itself
    with pytest.raises(FileNotFoundError, match=r"'Qwen/Qwen2.5-Math-7B' is not in the local Hugging Face cache "
                                                r"\(.*hf_home/hub\).*`hf download Qwen/Qwen2.5-Math-7B`"):
        H.resolve_checkpoint("Qwen/Qwen2.5-Math-7B")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        H.resolve_checkpoint("./not/here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="lacks config.json, \\*.safetensors weights"):
        H.resolve_checkpoint("empty")


def _save_run(workdir, cfg, params, tokenizer):
    """An r1jax run's checkpoint as the stages write it: TrainState + meta {model, tokenizer}."""
    import dataclasses

    from r1jax.train import checkpoint as ckpt_lib
    from r1jax.train.state import TrainState

    # the optimizer state is not exported; any pytree stands in for it (no per-leaf compiles of an optimizer init)
    state = TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state={"mu": params},
                       rng=jnp.zeros(2, jnp.uint32))
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
    ckpt.save(state, {"stage": "sft", "model": dataclasses.asdict(cfg), "tokenizer": tokenizer})
    ckpt.close()


def _assert_complete_export(out, src, cfg, params):
    """`out` loads in transformers with r1jax's logits, and carries the source's tokenizer, template and ids."""
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS % 256)).logits.numpy()
    assert np.abs(theirs - np.asarray(M.forward(params, jnp.asarray(TOKENS % 256), cfg)[0])).max() <= TOL
    tok, want = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(src)
    chat = [{"role": "user", "content": "What is 3+4?"}]
    assert tok.chat_template == want.chat_template is not None
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        want.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.get_vocab() == want.get_vocab() and tok.special_tokens_map == want.special_tokens_map
    gen, gen_src = (transformers.GenerationConfig.from_pretrained(d) for d in (out, src))
    assert gen.eos_token_id == gen_src.eos_token_id and len(gen.eos_token_id) == 2
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["eos_token_id"] == gen_src.eos_token_id and config["bos_token_id"] == want.bos_token_id
    assert config["pad_token_id"] == (want.pad_token_id if want.pad_token_id is not None else want.eos_token_id)


def test_export_a_training_run(hf_checkpoints, tmp_path):  # noqa: F811
    """A run initialised from the Qwen2 checkpoint (its weights moved, as training moves them) exports to a
    directory transformers loads as-is; a step dir works as well as the run dir."""
    from r1jax.hf.__main__ import main

    src = hf_checkpoints("qwen2")
    cfg, params = H.load_hf_checkpoint(src)
    rng = np.random.default_rng(1)  # numpy, not per-leaf jitted ops: no compiles
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.01 * rng.standard_normal(x.shape, np.float32)),
                          params)
    _save_run(tmp_path / "run", cfg, params, src)
    main(["--in", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    _assert_complete_export(str(tmp_path / "export"), src, cfg, params)
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "generation_config.json", "model.safetensors",
                                                       "tokenizer.json", "tokenizer_config.json"]
    main(["--in", str(tmp_path / "run" / "checkpoints" / "3"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert SafetensorsDir(str(tmp_path / "bf16")).info("model.embed_tokens.weight").dtype == jnp.bfloat16


def test_convert_hf_to_hf_keeps_the_tokenizer(hf_checkpoints, tmp_path):  # noqa: F811
    """HF -> HF through r1jax (Llama-3: chat_template.jinja, two EOS ids), by the CLI and the library route."""
    from r1jax.hf.__main__ import main

    src = hf_checkpoints("llama3")
    cfg, params = H.load_hf_checkpoint(src)
    main(["--in", src, "--out", str(tmp_path / "cli")])
    _assert_complete_export(str(tmp_path / "cli"), src, cfg, params)
    files = H.save_hf_checkpoint(str(tmp_path / "lib"), cfg, params, tokenizer=src)
    assert sorted(files) == sorted(os.listdir(tmp_path / "cli")) == sorted(os.listdir(src))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # copied unchanged
        assert (tmp_path / "lib" / name).read_bytes() == open(os.path.join(src, name), "rb").read()
