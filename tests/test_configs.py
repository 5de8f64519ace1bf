"""Every config file in configs/ parses (default and tiny presets, locked, with the run command in its
docstring), and its tiny preset builds its model and runs one train step (via its stage's smoke_step)."""

import glob
import importlib
import json
import os
import subprocess
import sys

import ml_collections as mlc
import pytest

from configs import common
from r1jax import models, stages
from r1jax.stages.common import model_config

from helpers import REPO, subprocess_env
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))


def _module(name):
    return importlib.import_module(f"configs.{name}")


# A file with get_config is a stage config; the others (common.py, preset tables) are helpers.
STAGE_CONFIGS = [name for name in CONFIGS if hasattr(_module(name), "get_config")]
HELPERS = [name for name in CONFIGS if name not in STAGE_CONFIGS]


def test_every_config_file_is_checked():
    assert STAGE_CONFIGS and "common" in HELPERS
    for name in HELPERS:  # a helper must not be a stage config that lost its get_config
        assert f"--config configs/{name}.py" not in (_module(name).__doc__ or ""), \
            f"configs/{name}.py documents a run command but has no get_config(arg=None)"


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_config_parses(name):
    module = _module(name)
    assert f"configs/{name}.py" in (module.__doc__ or ""), f"configs/{name}.py: put the run command in the docstring"
    for preset in (None, "tiny"):
        config = module.get_config(preset)
        assert isinstance(config, mlc.ConfigDict)
        assert config.stage in stages.STAGES, f"configs/{name}.py:{preset}: unknown stage {config.stage!r}"
        json.loads(config.to_json_best_effort())
        config.lock()
        with pytest.raises(AttributeError):
            config.no_such_field = 1
        if "model" in config:
            cfg = model_config(config.model)
            assert models.count_params(cfg)["total"] > 0
    with pytest.raises(ValueError):
        module.get_config("no_such_preset")


# The :hf preset (a Hugging Face checkpoint on one TPU host) of every stage config but these two.
NO_HF = {"pretrain": "continued pre-training from an HF checkpoint has no published recipe to take settings from",
         "r1": "the pipeline chains the 671B stages; its stages' configs have :hf presets of their own"}
HF_ARGS = {"eval": "hf:math500,humaneval", "all_scenario_rl": "hf,helpful=/rm1,harmless=/rm2"}
DATA_FIELDS = {"sft": ("prompt_field", "response_field", "messages_field", "system_field"),
               "grpo": ("prompt_field", "answer_field", "messages_field", "system_field")}


@pytest.mark.parametrize("name", [n for n in STAGE_CONFIGS if n not in NO_HF])
def test_hf_preset(name):
    """One TPU host (FSDP over every device, no expert or tensor axis), the HF checkpoint from init_from, the
    one-line command in the docstring, the data-mapping fields present, locked like every preset."""
    module = _module(name)
    arg = HF_ARGS.get(name, "hf")
    assert f"configs/{name}.py:{arg.split(',')[0].split(':')[0]}" in module.__doc__, f"configs/{name}.py: document :hf"
    config = module.get_config(arg)
    json.loads(config.to_json_best_effort())
    config.lock()
    assert dict(config.mesh.ici) == {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}
    checkpoint = config.models.model.checkpoint if config.stage == "eval" else config.init_from
    assert checkpoint == common.HF_CHECKPOINT
    for field in DATA_FIELDS.get(config.stage, ()):
        assert field in config.data, f"configs/{name}.py:hf has no data.{field}"
    if "model" in config:
        assert models.count_params(model_config(config.model))["total"] > 0


def test_eval_hf_runs_only_the_named_benchmarks():
    from configs import eval as eval_config
    assert list(eval_config.get_config("hf:gsm8k").benchmarks) == ["gsm8k"]
    for bad in ("hf", "hf:", "hf:mmlu"):
        with pytest.raises(ValueError, match="name the benchmarks"):
            eval_config.get_config(bad)


SMOKE_WORKER = r"""
import importlib, json, sys, time, traceback
from r1jax import stages
for name in sys.argv[1:]:
    start = time.perf_counter()
    try:
        config = importlib.import_module(f"configs.{name}").get_config("tiny")
        stage = stages.get_stage(config.stage)
        if not hasattr(stage, "smoke_step"):
            raise AttributeError(f"stage {config.stage!r} ({stage.__name__}) has no smoke_step(config)")
        result = {"metrics": stage.smoke_step(config)}
    except Exception:
        result = {"error": traceback.format_exc()}
    print(json.dumps({"name": name, "seconds": time.perf_counter() - start, **result}), flush=True)
"""


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """All tiny presets in one subprocess (shared compilation cache with the other tests' runs)."""
    cache = tmp_path_factory.getbasetemp() / "jax_cache"
    out = subprocess.run([sys.executable, "-c", SMOKE_WORKER, *STAGE_CONFIGS], env=subprocess_env(cache), cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return {r["name"]: r for r in map(json.loads, (l for l in out.stdout.splitlines() if l.startswith("{")))}


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_tiny_preset_builds_and_steps(name, smoke_results):
    result = smoke_results.get(name)
    assert result is not None, f"configs/{name}.py: no result from the smoke worker"
    assert "error" not in result, f"configs/{name}.py:tiny failed:\n{result.get('error')}"
    loss = result["metrics"]["loss"]
    assert loss == loss and 0.0 < loss < 50.0, result["metrics"]
