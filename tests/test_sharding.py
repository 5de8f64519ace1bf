"""Sharded equals unsharded on 8 fake CPU devices, over several mesh shapes; rule errors name the leaf."""

import json
import os
import subprocess
import sys

import pytest

from r1jax import models as M
from r1jax import sharding as S
from helpers import subprocess_env

# The MoE model goes through every mesh kind; the dense student through the tensor-parallel ones.
MESHES = {
    "tiny_moe": [{"data": 8}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"expert": 4, "fsdp": 2}],
    "tiny_dense": [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}],
}


def _run(preset):
    env = subprocess_env(xla_flags="--xla_force_host_platform_device_count=8")
    worker = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
    out = subprocess.run([sys.executable, worker, preset] + [json.dumps(m) for m in MESHES[preset]], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_sharded_matches_single_device(preset):
    rows = _run(preset)
    assert len(rows) == len(MESHES[preset])
    for r in rows:
        assert r["loss"] < 1e-5 and r["logits"] < 1e-4 and r["grads"] < 1e-5, r
        if r["mesh"] != {"data": 8}:
            assert r["sharded_leaves"] > 0, r  # params really are split across devices


def test_rule_errors_name_the_leaf():
    cfg = M.get_preset("tiny_moe")
    import jax

    mesh = S.make_mesh({"data": 1})
    with pytest.raises(S.ShardingError, match="no sharding rule"):
        S.logical_to_spec(("embed", "nonexistent"), S.DEFAULT_RULES, name="moe/attn/wq_b")
    bad_rules = dict(S.DEFAULT_RULES)
    bad_rules["vocab"] = "fsdp"  # collides with embed -> fsdp on the embedding [V, D]
    with pytest.raises(S.ShardingError, match="embed.*fsdp|fsdp.*embed"):
        S.logical_to_spec(("vocab", "embed"), tuple(bad_rules.items()), name="embed")
    fake = type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 3, "expert": 1, "tensor": 1}})()
    with pytest.raises(S.ShardingError, match=r"lm_head: dimension 0 \('embed'\).*not divisible"):
        S.logical_to_spec(("embed", "vocab"), S.DEFAULT_RULES, fake, (cfg.d_model, cfg.vocab_size), "lm_head")
    assert mesh.shape["data"] == jax.device_count()


def test_mesh_fill_and_errors():
    assert S.resolve_mesh_shape({"data": -1, "tensor": 2}, 8, "ici") == {"data": 4, "tensor": 2}
    with pytest.raises(S.ShardingError, match="at most one axis"):
        S.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8, "ici")
    with pytest.raises(S.ShardingError, match="not divisible"):
        S.resolve_mesh_shape({"data": -1, "tensor": 3}, 8, "ici")
    with pytest.raises(S.ShardingError, match="unknown mesh axis"):
        S.make_mesh({"model": 1})
