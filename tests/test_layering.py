"""The import layering, read from the source (no imports run): layers import downwards only, no stage module
imports another stage module, and every stage that trains goes through the one loop (r1jax/train/loop.py)."""

import ast
import os

import pytest

from r1jax.stages import STAGES

from helpers import REPO

# Lower layers first; a package may import its own layer and the ones before it.
LAYERS = (
    ("r1jax.host", "r1jax.distributed", "r1jax.sharding", "r1jax.models"),
    ("r1jax.data", "r1jax.hf", "r1jax.flops"),
    ("r1jax.world",),
    ("r1jax.train", "r1jax.rl", "r1jax.eval"),
    ("r1jax.stages",),
    ("r1jax.main", "r1jax.aot", "r1jax.bench", "r1jax.launch_local"),
)
LAYER = {package: i for i, packages in enumerate(LAYERS) for package in packages}
TRAINING_STAGES = ("sft", "grpo", "reward_model")


def _modules():
    """{module name: path} of every module under r1jax/."""
    out = {}
    for root, _, files in os.walk(os.path.join(REPO, "r1jax")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[module.removesuffix(".__init__")] = path
    return out


def _imports(path: str) -> set[str]:
    """Every r1jax module or name a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in out if name.startswith("r1jax")}


def _package(module: str) -> str:
    if module.endswith(".__main__"):  # a package's command line (e.g. `python -m r1jax.hf` export) is a command
        return "r1jax.main"
    return ".".join(module.split(".")[:2])


MODULES = _modules()


def test_every_package_has_a_layer():
    packages = {_package(m) for m in MODULES} - {"r1jax"}
    assert packages <= LAYER.keys(), f"packages without a layer in tests/test_layering.py: {packages - LAYER.keys()}"


def test_layers_import_downwards_only():
    upward = [f"{module} imports {name}" for module, path in MODULES.items() if _package(module) in LAYER
              for name in _imports(path) if _package(name) in LAYER and LAYER[_package(name)] > LAYER[_package(module)]]
    assert not upward, upward


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another_stage(stage):
    module = STAGES[stage]
    others = {m for m in STAGES.values() if m != module}
    names = _imports(MODULES[module])
    imported = {n for n in names if n in others or n.rsplit(".", 1)[0] in others}
    assert not imported, f"{module} imports the stage module(s) {sorted(imported)}"
    if stage != "pipeline":  # the pipeline runs stages through the registry: the one way to chain them
        assert "r1jax.stages" not in names and "r1jax.stages.run" not in names, f"{module} runs other stages"


def test_the_pipelines_child_runs_stages_only_through_the_registry():
    names = _imports(MODULES["r1jax.stages.child"])
    assert not {n for n in names if n.startswith("r1jax.stages.")}, names


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_training_stages_share_the_one_loop(stage):
    """run() opens the run and hands its step to the run's loop; it has no loop over steps of its own, saves no
    checkpoint and handles no signal (the loop's jobs)."""
    path = MODULES[STAGES[stage]]
    run = next(node for node in ast.parse(open(path).read(), path).body
               if isinstance(node, ast.FunctionDef) and node.name == "run")
    nodes = list(ast.walk(run))
    names = {n.id for n in nodes if isinstance(n, ast.Name)} | {n.attr for n in nodes if isinstance(n, ast.Attribute)}
    assert {"open_run", "loop"} <= names, f"{path}: run() does not use open_run and the run's loop"
    assert not any(isinstance(n, ast.While) for n in nodes), f"{path}: run() has a while loop of its own"
    saves = [n for n in nodes if isinstance(n, ast.Attribute) and n.attr == "save"
             and "checkpointer" in ast.unparse(n.value)]
    assert not saves and not names & {"signal", "Preemption", "reached_preemption"}, f"{path}: does the loop's job"
