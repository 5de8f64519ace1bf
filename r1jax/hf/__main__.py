"""Export a training run, or convert an HF checkpoint: `python -m r1jax.hf --in SRC --out DIR [--dtype bfloat16]`.

SRC is an r1jax run directory (its latest checkpoint), its `checkpoints/` or one step directory, or a Hugging Face
checkpoint directory (or a Hub id in the local cache). The output is a directory that `transformers`, vLLM and
SGLang load as-is: safetensors weights, config.json with the special-token ids, generation_config.json with every
EOS id, and the tokenizer files and chat template of the source checkpoint, copied unchanged.

What a run must record to be exportable (the `meta` saved with each checkpoint step, r1jax/train/checkpoint.py):
`model` (the ModelConfig as a dict) and `tokenizer`, the directory of the HF checkpoint whose tokenizer the run
uses (for a run initialised from an HF checkpoint, that checkpoint, resolved to a directory, or a copy of its
TOKENIZER_FILES). A run whose tokenizer is a SentencePiece .model (the tiny world) exports the model alone.

Other uses: dequantise the FP8 DeepSeek-V3 release to bf16, re-shard, or check that a checkpoint loads (every
tensor used, every shape right) with no `--out`. The model is gathered onto one device (host memory for the CPU).
"""

import argparse
import os

import jax

from r1jax.hf.hub import resolve_checkpoint
from r1jax.hf.load import load_hf_checkpoint
from r1jax.hf.save import save_hf_checkpoint


def load_run(path: str):
    """(cfg, params, tokenizer dir or None) of the r1jax checkpoint at `path` (a run dir, its checkpoints/ or a step
    dir), params on one device; None when `path` holds no r1jax checkpoint."""
    from r1jax import models  # noqa: PLC0415
    from r1jax.train import checkpoint as ckpt_lib  # noqa: PLC0415

    found = ckpt_lib.find_checkpoint(path)
    if found is None:
        return None
    directory, step = found
    reader = ckpt_lib.Checkpointer(directory, read_only=True)
    meta = reader.restore_meta(step)
    reader.close()
    if "model" not in meta:
        raise SystemExit(f"{directory}/{step}: the checkpoint's meta has no 'model' (ModelConfig); it cannot be "
                         "exported (see `python -m r1jax.hf --help`)")
    cfg = models.ModelConfig(**meta["model"])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, models.abstract_params(cfg))
    params, _ = ckpt_lib.load_params(os.path.join(directory, str(step)), cfg, shardings)
    tokenizer = meta.get("tokenizer")
    if not (isinstance(tokenizer, str) and os.path.isfile(os.path.join(tokenizer, "tokenizer.json"))):
        print(f"note: the run's tokenizer {tokenizer!r} is not an HF checkpoint directory that still exists; "
              "exporting the model without tokenizer files")
        tokenizer = None
    print(f"loaded run checkpoint {directory}/{step}")
    return cfg, params, tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m r1jax.hf", description=__doc__.splitlines()[0])
    ap.add_argument("--in", dest="src", required=True,
                    help="r1jax run dir / checkpoints dir / step dir, or an HF checkpoint dir or Hub id")
    ap.add_argument("--out", help="directory to write (omit to only check that --in loads)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokenizer", help="HF checkpoint dir whose tokenizer goes along (default: the source's)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--no-mtp", action="store_true", help="drop the multi-token-prediction layer")
    args = ap.parse_args(argv)
    run = load_run(args.src)
    if run is not None:
        cfg, params, tokenizer = run
    else:
        src = resolve_checkpoint(args.src)
        cfg, params = load_hf_checkpoint(src, dtype=args.dtype, mtp=False if args.no_mtp else None)
        tokenizer = src if os.path.isfile(os.path.join(src, "tokenizer.json")) else None
    tokenizer = args.tokenizer or tokenizer
    print(f"loaded {args.src}: {cfg.n_layers} layers, d_model {cfg.d_model}, mtp_depth {cfg.mtp_depth}")
    if args.out:
        files = save_hf_checkpoint(args.out, cfg, params, dtype=args.dtype, tokenizer=tokenizer,
                                   max_shard_bytes=int(args.max_shard_gb * 2**30))
        print(f"wrote {len(files)} files to {args.out}" + ("" if tokenizer else " (no tokenizer)"))


if __name__ == "__main__":
    main()
