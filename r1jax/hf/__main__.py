"""Convert an HF checkpoint through r1jax: `python -m r1jax.hf --in DIR --out DIR [--dtype bfloat16]`.

Typical uses: dequantise the FP8 DeepSeek-V3 release to bf16, re-shard, or check that a checkpoint loads (every
tensor used, every shape right) with no `--out`. The converted model is held in device memory.
"""

import argparse

from r1jax.hf.load import load_hf_checkpoint
from r1jax.hf.save import save_hf_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m r1jax.hf", description=__doc__.splitlines()[0])
    ap.add_argument("--in", dest="src", required=True, help="HF checkpoint directory to read")
    ap.add_argument("--out", help="directory to write (omit to only check that --in loads)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--no-mtp", action="store_true", help="drop the multi-token-prediction layer")
    args = ap.parse_args(argv)
    cfg, params = load_hf_checkpoint(args.src, dtype=args.dtype, mtp=False if args.no_mtp else None)
    print(f"loaded {args.src}: {cfg.n_layers} layers, d_model {cfg.d_model}, mtp_depth {cfg.mtp_depth}")
    if args.out:
        files = save_hf_checkpoint(args.out, cfg, params, dtype=args.dtype,
                                   max_shard_bytes=int(args.max_shard_gb * 2**30))
        print(f"wrote {len(files)} files to {args.out}")


if __name__ == "__main__":
    main()
