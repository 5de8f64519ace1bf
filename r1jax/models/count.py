"""Print a preset's parameter counts from abstract params (nothing is allocated).

    python -m r1jax.models.count deepseek_v3_671b
"""

import argparse

from r1jax.models.config import PRESETS, get_preset
from r1jax.models.transformer import count_params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", default="deepseek_v3_671b", choices=sorted(PRESETS))
    args = ap.parse_args(argv)
    cfg = get_preset(args.preset)
    c = count_params(cfg)
    print(f"{args.preset}: total {c['total'] / 1e9:.2f}B parameters, activated per token {c['activated'] / 1e9:.2f}B"
          + (f", MTP module {c['mtp'] / 1e9:.2f}B" if c["mtp"] else ""))
    print(f"  cache per token per layer: {cfg.cache_values_per_token} values ({cfg.attention})")
    return c


if __name__ == "__main__":
    main()
