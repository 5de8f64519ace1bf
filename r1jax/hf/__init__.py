"""Hugging Face checkpoints <-> r1jax, in both directions, for DeepSeek-V3/R1 and the Qwen2 / Llama-3 students.

  config_from_hf(dict) -> ModelConfig          config_to_hf(cfg) -> dict           (config.py)
  load_hf_checkpoint(dir, dtype=, mesh=, rules=) -> (cfg, params)   streaming, sharded, FP8-aware (load.py)
  save_hf_checkpoint(dir, cfg, params, dtype=, max_shard_bytes=)    tensor by tensor (save.py)

Files: layout.py (the one name/shape table both directions use), safetensors_io.py (lazy reads, streamed
writes), fp8.py (block-wise dequantisation). CLI: `python -m r1jax.hf --in DIR --out DIR [--dtype bfloat16]`.
Parity with the `transformers` models is tested in tests/test_hf.py.
"""

from r1jax.hf.config import HFConfigError, config_from_hf, config_to_hf
from r1jax.hf.load import load_hf_checkpoint
from r1jax.hf.safetensors_io import CheckpointError
from r1jax.hf.save import save_hf_checkpoint

__all__ = ["CheckpointError", "HFConfigError", "config_from_hf", "config_to_hf", "load_hf_checkpoint",
           "save_hf_checkpoint"]
