"""Packing: batch layout (segments, positions, targets within documents, masks) and resumable state."""

import json

import grain
import numpy as np
import pytest

from r1jax.data import packing

PAD = 0


def _examples(n, seed=0, max_len=20):
    """Random documents with distinct tokens; the mask trains a random suffix (the "response")."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        length = int(rng.integers(2, max_len + 1))
        tokens = rng.integers(1, 1000, size=length).astype(np.int32)
        tokens[0] = 1000 + i  # a document id, so tests can tell documents apart
        mask = (np.arange(length) >= rng.integers(1, length)).astype(np.int32)
        examples.append({"tokens": tokens, "loss_mask": mask, "epoch": i // 10})
    return examples


def _unpack(batch):
    """Documents of a batch, recovered from inputs/segment_ids only; also checks the other fields."""
    docs = []
    for b in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][b]
        assert np.all(seg[np.count_nonzero(seg):] == 0), "padding is a suffix of the row"
        for k in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == k)
            assert np.all(np.diff(where) == 1), "a document must be contiguous"
            tokens = batch["inputs"][b, where]
            np.testing.assert_array_equal(batch["positions"][b, where], np.arange(len(where)))
            np.testing.assert_array_equal(batch["targets"][b, where[:-1]], tokens[1:])
            assert batch["loss_mask"][b, where[-1]] == 0, "the last token has no target"
            assert batch["targets"][b, where[-1]] == PAD, "targets never cross documents"
            docs.append((tokens, batch["loss_mask"][b, where]))
        pad = seg == 0
        assert np.all(batch["inputs"][b, pad] == PAD) and np.all(batch["loss_mask"][b, pad] == 0)
    return docs


def test_pack_rows_layout_by_hand():
    a = {"tokens": np.array([5, 6, 7]), "loss_mask": np.array([0, 1, 1])}
    b = {"tokens": np.array([8, 9]), "loss_mask": np.array([0, 1])}
    batch = packing.pack_rows([[a, b], []], seq_len=6, pad_id=PAD)
    assert set(batch) == set(packing.BATCH_KEYS)
    assert {k: v.dtype.name for k, v in batch.items()} == {
        "inputs": "int32", "targets": "int32", "loss_mask": "float32",
        "segment_ids": "int32", "positions": "int32"}
    np.testing.assert_array_equal(batch["inputs"][0], [5, 6, 7, 8, 9, 0])
    np.testing.assert_array_equal(batch["targets"][0], [6, 7, 0, 9, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 0, 1, 0])
    assert not batch["segment_ids"][1].any() and not batch["loss_mask"][1].any()
    with pytest.raises(ValueError, match="do not fit seq_len=4"):
        packing.pack_rows([[a, b]], seq_len=4, pad_id=PAD)


def _dataset(examples, pack=True, batch_size=3, seq_len=32):
    parent = grain.MapDataset.source(examples).to_iter_dataset()
    return packing.PackedBatchDataset(parent, seq_len=seq_len, batch_size=batch_size,
                                      pad_id=PAD, pack=pack)


@pytest.mark.parametrize("pack", [True, False])
def test_every_document_once_with_masks_shifted(pack):
    examples = _examples(40)
    batches = list(_dataset(examples, pack=pack))
    docs = [d for batch in batches for d in _unpack(batch)]
    by_id = {int(ex["tokens"][0]): ex for ex in examples}
    assert sorted(int(tokens[0]) for tokens, _ in docs) == sorted(by_id)
    for tokens, loss_mask in docs:
        ex = by_id[int(tokens[0])]
        np.testing.assert_array_equal(tokens, ex["tokens"])
        # Position t is trained iff token t+1 is a response token.
        np.testing.assert_array_equal(loss_mask[:-1], ex["loss_mask"][1:])
    max_segments = max(int(b["segment_ids"].max()) for b in batches)
    assert max_segments > 1 if pack else max_segments == 1
    if pack:
        assert len(batches) < len(_examples(40)) / 3  # packing saves rows over one per row
    assert all(b["inputs"].shape == (3, 32) for b in batches)


def test_first_fit_order_is_deterministic():
    lengths = [20, 20, 10, 12, 2, 30]
    examples = [{"tokens": np.arange(1, n + 1), "loss_mask": np.ones(n)} for n in lengths]
    batches = list(_dataset(examples, batch_size=2))
    # 20 -> row0, 20 -> row1, 10 -> row0 (30), 12 -> row1 (32), 2 -> row0 (32), 30 fits nowhere.
    assert [b["segment_ids"].max(axis=1).tolist() for b in batches] == [[3, 2], [1, 0]]


def test_state_restores_exact_batches_at_every_boundary():
    examples = _examples(60, seed=1)
    reference = list(_dataset(examples))
    it = iter(_dataset(examples))
    for k in range(len(reference) + 1):
        state = json.loads(json.dumps(it.get_state()))
        resumed = iter(_dataset(examples))
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(reference) - k
        for got, want in zip(rest, reference[k:]):
            for key in packing.BATCH_KEYS:
                np.testing.assert_array_equal(got[key], want[key])
        if k < len(reference):
            next(it)
            assert it.epoch == max(int(t[0]) - 1000 for t, _ in _unpack(reference[k])) // 10
    with pytest.raises(StopIteration):
        next(it)
