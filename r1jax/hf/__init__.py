"""Hugging Face checkpoints <-> r1jax, in both directions, for DeepSeek-V3/R1 and the Qwen2 / Llama-3 students.

  config_from_hf(dict) -> ModelConfig          config_to_hf(cfg) -> dict           (config.py)
  load_hf_checkpoint(dir, dtype=, mesh=, rules=) -> (cfg, params)   streaming, sharded, FP8-aware (load.py)
  save_hf_checkpoint(dir, cfg, params, dtype=, max_shard_bytes=, tokenizer=)   tensor by tensor; with the source's
      tokenizer files, chat template, special-token ids and generation_config.json (save.py)
  resolve_checkpoint(name_or_dir) -> dir   a directory, or a Hub id in the local HF cache, never downloaded (hub.py)

Files: layout.py (the one name/shape table both directions use), safetensors_io.py (lazy reads, streamed
writes), fp8.py (block-wise dequantisation). CLI: `python -m r1jax.hf --in RUN_OR_HF_DIR --out DIR [--dtype bfloat16]`
(exports a training run; __main__.py says what a run must record).
Parity with the `transformers` models is tested in tests/test_hf.py.
"""

from r1jax.hf.config import HFConfigError, config_from_hf, config_to_hf
from r1jax.hf.hub import resolve_checkpoint
from r1jax.hf.load import load_hf_checkpoint
from r1jax.hf.safetensors_io import CheckpointError
from r1jax.hf.save import copy_tokenizer_files, save_hf_checkpoint

__all__ = ["CheckpointError", "HFConfigError", "config_from_hf", "config_to_hf", "copy_tokenizer_files",
           "load_hf_checkpoint", "resolve_checkpoint", "save_hf_checkpoint"]
