"""Packing tokenised samples into fixed [B, T] batches, deterministically and resumably.

The batch format is the contract with the trainer (dict of numpy arrays):

    inputs       [B, T] int32    tokens; padding = pad_id
    targets      [B, T] int32    the next token of the same document (pad_id where none)
    loss_mask    [B, T] float32  1 where the target is a trained (response) token, else 0; the
                                 last token of a document and padding are always 0
    segment_ids  [B, T] int32    1..k for the k documents of a row, 0 on padding
    positions    [B, T] int32    position within the document, restarting at 0

An example is a dict with `tokens` [n] and `loss_mask` [n], where `loss_mask[i] = 1` marks token i
as a training target (see templates.encode_sft_example); optional `epoch` is passed through to
the iterator's `epoch`.

Packing is first-fit over the B rows of the batch being built: an example goes into the first row
with room for it; when no row has room, the batch is emitted and the example starts the next one.
With `pack=False` an example only goes into an empty row (one document per row). A finite input
ends with a last batch padded with empty rows, so every batch has the same shape.

Checkpointing: the only thing carried from one batch to the next is the example that did not fit,
so the iterator's state is the parent's state just before that example was read. Restoring
re-reads it and produces exactly the same batches as an uninterrupted run. A batch interrupted by
an exception from upstream (sources.StopRequested on SIGTERM) leaves the state where the last
returned batch left it: the checkpoint then written loses nothing, and a later `next` re-reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def pack_rows(rows: Sequence[Sequence[dict]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Lays out rows of examples (each row's total length <= seq_len) as one batch dict."""
    shape = (len(rows), seq_len)
    batch = {
        "inputs": np.full(shape, pad_id, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for b, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row, start=1):
            tokens, mask = example["tokens"], example["loss_mask"]
            n = len(tokens)
            end = start + n
            if end > seq_len:
                raise ValueError(f"row {b}: documents of {end} tokens do not fit seq_len={seq_len}")
            batch["inputs"][b, start:end] = tokens
            # Token i predicts token i+1 of its own document; the last token predicts nothing.
            batch["targets"][b, start:end - 1] = tokens[1:]
            batch["loss_mask"][b, start:end - 1] = mask[1:]
            batch["segment_ids"][b, start:end] = segment
            batch["positions"][b, start:end] = np.arange(n)
            start = end
    return batch


class PackedBatchDataset(grain.IterDataset):
    """Batches of packed examples from an IterDataset of examples (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, batch_size: int,
                 pad_id: int, pack: bool = True):
        super().__init__(parent)
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}: expected >= 2 and >= 1")
        self.seq_len, self.batch_size, self.pad_id, self.pack = seq_len, batch_size, pad_id, pack

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"PackedBatchDataset(seq_len={self.seq_len}, batch_size={self.batch_size}, pack={self.pack})"


class PackedBatchIterator(grain.DatasetIterator):
    """Iterator of `PackedBatchDataset`; state = {"parent": ..., "epoch": ...}, JSON-friendly."""

    def __init__(self, parent: grain.DatasetIterator, config: PackedBatchDataset):
        super().__init__(parent)
        self._config = config
        self._resume_state = parent.get_state()  # parent state before the carried example
        self._carried: dict | None = None
        self.epoch = 0  # epoch of the newest example in the last batch returned
        self.fill = 0.0  # share of non-padding tokens in the last batch returned
        self._rewind = False  # a batch was interrupted: the parent is ahead of _resume_state

    def _fits(self, length: int, free: int) -> bool:
        seq_len = self._config.seq_len
        if length > seq_len:
            raise ValueError(f"an example of {length} tokens cannot fit seq_len={seq_len}")
        return free >= length if self._config.pack else free == seq_len

    def __next__(self) -> dict[str, np.ndarray]:
        if self._rewind:
            self.set_state(self.get_state())
        start = self._resume_state, self._carried
        try:
            return self._next_batch()
        except StopIteration:
            raise
        except BaseException:
            self._resume_state, self._carried = start
            self._rewind = True
            raise

    def _next_batch(self) -> dict[str, np.ndarray]:
        cfg = self._config
        rows: list[list[dict]] = [[] for _ in range(cfg.batch_size)]
        free = [cfg.seq_len] * cfg.batch_size
        example = self._carried
        while True:
            if example is None:
                state_before = self._parent.get_state()
                try:
                    example = next(self._parent)
                except StopIteration:
                    self._carried, self._resume_state = None, state_before
                    if not any(rows):
                        raise
                    return self._emit(rows, free)
                self._carried, self._resume_state = example, state_before
            length = len(example["tokens"])
            row = next((r for r in range(cfg.batch_size) if self._fits(length, free[r])), None)
            if row is None:
                return self._emit(rows, free)  # `example` stays carried into the next batch
            rows[row].append(example)
            free[row] -= length
            self._carried = example = None

    def _emit(self, rows: list[list[dict]], free: list[int]) -> dict[str, np.ndarray]:
        cfg = self._config
        self.epoch = max((ex.get("epoch", 0) for row in rows for ex in row), default=self.epoch)
        self.fill = 1.0 - sum(free) / (cfg.batch_size * cfg.seq_len)
        return pack_rows(rows, cfg.seq_len, cfg.pad_id)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._resume_state, "epoch": self.epoch}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._resume_state, self._carried, self.epoch = state["parent"], None, state["epoch"]
        self._rewind = False

    def metrics(self) -> dict[str, float]:
        """Upstream metrics (skip counters, when the parent has them), epoch and batch fill."""
        upstream = getattr(self._parent, "metrics", None)
        return {**(upstream() if upstream else {}), "data/epoch": self.epoch, "data/fill": self.fill}
