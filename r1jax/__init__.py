"""r1jax: the DeepSeek-R1 recipe in JAX."""
