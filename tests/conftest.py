"""Test session defaults: JAX on CPU (an installed libtpu must not be probed), exact fp32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
