"""The AOT fit check: topology names, the FLOP count, the report; and real compiles of the tiny MoE model's SFT
and GRPO steps for a 4-chip v5p slice with expert parallelism (needs libtpu, the `tpu` extra)."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from r1jax import aot, flops
from r1jax import models as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e .[tpu]); it gives the TPU topology")
# Tiny shapes so one compile takes seconds; expert=2 puts the MoE exchange (ragged all-to-all) in the program.
TINY = ["--config.mesh.ici.expert=2", "--config.model.overrides.n_layers=2"]


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "r1jax.aot", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    return out.returncode, out.stdout, out.stderr


def test_topology_names():
    assert aot.parse_topology("v5p-512") == ("v5p", "v5p:4x8x8")
    assert aot.parse_topology("v5p-8") == ("v5p", "v5p:2x2x1")
    assert aot.parse_topology("v5p-128") == ("v5p", "v5p:4x4x4")
    assert aot.parse_topology("v4-256") == ("v4", "v4:4x4x8")
    assert aot.parse_topology("v6e-256") == ("v6e", "v6e:16x16")
    assert aot.parse_topology("v5litepod-32") == ("v5e", "v5e:4x8")
    assert aot.parse_topology("v5p:4x8x8") == ("v5p", "v5p:4x8x8")
    for bad in ("v5p-96", "v7x-8", "tpu-512", "v5p-"):
        with pytest.raises(ValueError):
            aot.parse_topology(bad)


def test_flop_count_multiplies_loop_trip_counts():
    def f(x, w):  # L layers of [8,16] @ [16,16] in a scan, then one [8,16] @ [16,4]
        h = jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]
        return h @ jnp.ones((16, 4))

    for n_layers in (2, 8):
        jaxpr = jax.make_jaxpr(f)(jnp.ones((8, 16)), jnp.ones((n_layers, 16, 16)))
        assert flops.jaxpr_flops(jaxpr) == flops.FlopCount(2 * 8 * 16 * 16 * n_layers + 2 * 8 * 16 * 4)
    # d/dx: the forward once, and in the backward one cotangent matmul per matmul (no d/dw asked for).
    grad = jax.make_jaxpr(jax.grad(lambda x, w: f(x, w).sum()))(jnp.ones((8, 16)), jnp.ones((3, 16, 16)))
    assert flops.jaxpr_flops(grad) == flops.FlopCount(2 * (2 * 8 * 16 * 16 * 3 + 2 * 8 * 16 * 4))


def test_ragged_dot_flops_and_while_loops():
    x, w, sizes = jnp.ones((12, 16)), jnp.ones((3, 16, 8)), jnp.array([4, 4, 4], jnp.int32)
    f = 2 * 12 * 16 * 8
    assert flops.jaxpr_flops(jax.make_jaxpr(jax.lax.ragged_dot)(x, w, sizes)) == flops.FlopCount(f, 0, f)
    loop = jax.make_jaxpr(lambda x: jax.lax.while_loop(lambda c: c[0, 0] < 5, lambda c: c @ jnp.ones((16, 16)), x))
    assert flops.jaxpr_flops(loop(x)) == flops.FlopCount(2 * 12 * 16 * 16, 1)
    # a cond whose other branch has no matmul (the chunked attention's key blocks): counted, and skippable
    skip = jax.make_jaxpr(lambda x: jax.lax.cond(x[0, 0] > 0, lambda c: c @ jnp.ones((16, 16)), lambda c: c, x))
    assert flops.jaxpr_flops(skip(x)) == flops.FlopCount(2 * 12 * 16 * 16, skippable=2 * 12 * 16 * 16)
    assert flops.causal_block_share(32768, 2048) == 17 / 32 and flops.causal_block_share(1000, 2048) == 1.0


def test_grouped_kernel_flops_from_the_kernels_tile_count():
    """The gmm kernels of a grouped SwiGLU (3 in the forward) over a buffer of 40 rows, 4 experts, Tm = 8: the bound
    is the kernel's longest grid (5 row tiles + 3), balanced the tiles covering 16 rows split 4 / 4 / 4 / 4."""
    from r1jax.models import gmm

    rows, sizes = jnp.ones((40, 16)), jnp.array([10, 0, 17, 5], jnp.int32)
    wg, wd = jnp.ones((4, 16, 32)), jnp.ones((4, 32, 16))
    jaxpr = jax.make_jaxpr(lambda r: gmm.grouped_swiglu(r, sizes, wg, wg, wd, (8, 128, 128)))(rows)
    count = flops.jaxpr_flops(jaxpr, balanced_rows=lambda n_rows, n_groups: 16)
    per_tile = 3 * 2 * 8 * 16 * 32  # gate, up, down: one Tm x 16 x 32 block matmul each
    assert count.gmm_bound == count.flops == per_tile * gmm.max_active_tiles(40, 4, 8) == per_tile * 8
    assert count.gmm_balanced == per_tile * 4  # rows 0-16 are 2 tiles, each computed for the 2 groups in it
    assert count.balanced == count.flops - count.gmm_bound + count.gmm_balanced


def test_activated_params_671b():
    cfg = M.get_preset("deepseek_v3_671b")
    main = M.count_params(cfg)["activated"]
    assert 36e9 < main < 39e9  # ~37B (docs/reference.md §1)
    assert flops.activated_params(cfg.replace(mtp_depth=0)) == main
    assert flops.activated_params(cfg) > main  # + the MTP module's shared and 8 routed experts


def test_report_verdict():
    r = aot.StepReport("step", arguments=10 * aot.GIB, outputs=10 * aot.GIB, aliased=10 * aot.GIB,
                       temporaries=5 * aot.GIB, code=0, resident=2 * aot.GIB, flops=4e12, tokens=1000,
                       model_flops_per_token=3e9)
    assert r.total == 17 * aot.GIB and r.fits(17 * aot.GIB) and not r.fits(16 * aot.GIB)
    text = aot.format_report([r], title="t", hbm_gib=16, n_chips=4, peak_tflops=100)
    assert "DOES NOT FIT: step exceed 16 GiB" in text and "ratio 1.33" in text


@needs_libtpu
def test_sft_step_compiles_for_a_v5p_slice():
    code, out, err = _cli("--config", "configs/sft.py:tiny", "--topology", "v5p:2x2x1", *TINY,
                          "--config.data.seq_len=64", "--config.model.overrides.attn_block=16")
    assert code == 0, err[-3000:]
    assert "4 chips" in out and "mesh fsdp=2, expert=2" in out
    assert "[sft train step]" in out and "HBM per chip (GiB): arguments" in out and "temporaries" in out
    assert "FLOPs per step" in out and "FLOPs per token" in out
    # moe_impl="auto" compiles the Pallas grouped-matmul kernels for TPU, counted at both grids
    assert "Pallas gmm/tgmm" in out and "balanced routing" in out and "6 N + attention" in out
    # chunked attention (4 x 4 blocks of 16): its lax.cond over key blocks is still a conditional on TPU, the
    # block matmuls in one branch only (forward, remat and backward of each layer)
    skipping, total = map(int, re.search(r"compiled: (\d+) of (\d+) conditionals", out).groups())
    assert skipping == total >= 6
    assert out.strip().splitlines()[-1].startswith("FITS")


@needs_libtpu
def test_grpo_steps_compile_for_a_v5p_slice():
    """The tiny preset's GRPO stage with the slot engine (rl.engine = "slots", 4 slots for 8 rows) and decode
    attention over prefixes of whole key blocks of 8 over caches of 16 + 8 positions."""
    code, out, err = _cli("--config", "configs/r1_zero.py:tiny", "--topology", "v5p-8", *TINY,
                          "--config.rl.prompts_per_rollout=4", "--config.rl.group_size=2",
                          "--config.rl.max_new_tokens=8", "--config.rl.prompt_buckets=(16,)",
                          "--config.rl.completion_buckets=(8,)", "--config.rl.beta=0.01", "--config.rl.slots=4",
                          "--config.model.overrides.decode_block=8")
    assert code == 0, err[-3000:]
    for step in ("[grpo policy update]", "[grpo log-prob pass (pi_old, pi_ref)]",
                 "[grpo engine prefill (prompt cache)]", "[grpo engine chunk (decode steps + insertion)]  (S=4 slots",
                 "[grpo engine drain (compact S -> S/2)]"):
        assert step in out, out
    assert out.count("resident outside this step") == 5  # the reference (beta > 0) and the optimizer state
    # the chunk's while_loop (decode attention's prefixes are a lax.switch: its widest branch is counted)
    assert "1 while_loop bodies counted once" in out and "counts its widest branch" in out
    assert out.strip().splitlines()[-1].startswith("FITS")


@needs_libtpu
def test_unshardable_config_does_not_fit():
    code, out, _ = _cli("--config", "configs/sft.py:tiny", "--topology", "v5p:2x2x1", *TINY,
                        "--config.data.batch_size=6")
    assert code == 1
    assert "DOES NOT FIT: the config cannot be sharded" in out and "not divisible" in out
