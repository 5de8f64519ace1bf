"""What every stage module may import from its own package: the StageResult it returns and the helpers around it.

They live in r1jax/train/run.py (the run lifecycle below the stages); this module names them for code that
reads a stage's outputs (r1jax/aot.py, the tests) and for the stages that do not train (eval, report, pipeline).
A stage module never imports another stage module (tests/test_layering.py).
"""

from r1jax.train.run import StageResult, is_primary, mesh_and_rules, model_config, model_overrides, write_json

__all__ = ["StageResult", "is_primary", "mesh_and_rules", "model_config", "model_overrides", "write_json"]
