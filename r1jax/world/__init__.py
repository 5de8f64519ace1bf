"""The tiny world: a seeded synthetic universe in which every stage of the R1 recipe has something real to learn
on a 2-core CPU. It is a benchmark world, not the data layer: stages read it as ordinary JSONL files.

  build.py        writes the world's JSONL files and manifest.json (`python -m r1jax.world.build --out DIR`)
  tasks.py        verifiable arithmetic / countdown tasks      text.py         their prompts and worked solutions
  corpus.py       the pre-training corpus                       code.py         one-line code tasks with tests
  facts.py        facts, dialogues, non-reasoning SFT, safety   preferences.py  reward-model pairs
  lexicon.py      the bilingual lexicon and its language measure

Here: `ensure_world(dir, seed)` writes DIR/world once, `world_tokenizer` trains its SentencePiece model once. The
pipeline's `@world:<file>` references and a stage config's `data.tiny_world` (files left empty) both go through them.
"""

from __future__ import annotations

import os
import shutil


def ensure_world(workdir: str, seed: int) -> str:
    """WORKDIR/world: the tiny synthetic world, written once (into a temporary dir, then renamed).

    Every process of a multi-host job calls this: on per-host disks each writes its own copy; on a shared disk the
    first rename wins and the others drop their (identical, seeded) copies, so no process ever sees the directory
    half written or removed under it."""
    world = os.path.join(workdir, "world")
    manifest = os.path.join(world, "manifest.json")
    if not os.path.isfile(manifest):
        from r1jax.world.build import write_world

        tmp = f"{world}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_world(tmp, seed)
        try:
            os.rename(tmp, world)  # fails on a non-empty `world`: another process renamed its copy first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isfile(manifest):
                raise
    return world


def world_files(workdir: str, seed: int, names) -> list[str]:
    """The world's files `names` (without .jsonl), the world written into WORKDIR/world on demand."""
    world = ensure_world(workdir, seed)
    return [os.path.join(world, f"{name}.jsonl") for name in names]


def world_tokenizer(workdir: str, seed: int, vocab_size: int) -> str:
    """WORKDIR/world/tokenizer.model: a SentencePiece model over every text field of the world (trained once), so all
    stages share one tokenizer."""
    world = ensure_world(workdir, seed)
    prefix = os.path.join(world, "tokenizer")
    if not os.path.isfile(prefix + ".model"):
        train_world_tokenizer(world, prefix, vocab_size)
    return prefix + ".model"


def train_world_tokenizer(world: str, prefix: str, vocab_size: int) -> str:
    """PREFIX.model / .vocab: a SentencePiece model over every text field of the world directory `world`."""
    from r1jax.data import tokenizer as tok_lib

    files = sorted(os.path.join(world, n) for n in os.listdir(world) if n.endswith(".jsonl"))
    texts = list(tok_lib.texts_from_files(files, ["text", "prompt", "response", "chosen", "rejected"]))
    tmp = f"{prefix}.tmp{os.getpid()}"
    tok_lib.train_sentencepiece(texts, tmp, vocab_size)
    for ext in (".vocab", ".model"):
        os.replace(tmp + ext, prefix + ext)
    return prefix + ".model"
