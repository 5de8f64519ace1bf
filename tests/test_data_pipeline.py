"""make_sft_dataset: batches, epochs and shuffling, exact resume, host shards, malformed samples."""

import json

import numpy as np
import pytest

from r1jax.data import packing, pipeline
from r1jax.data import tokenizer as tk
from r1jax.data.sources import DataError

N = 24


def _record(i):
    return {"prompt": f"What is {i} plus {i}?", "response": f"<think>{i}+{i}</think><answer>{2 * i}</answer>"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = [json.dumps(_record(i)) for i in range(N)]
    return tk.load_tokenizer(
        tk.train_sentencepiece(corpus, str(tmp_path_factory.mktemp("tok") / "tok"), 340))


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(N)))
    return str(path)


def _docs(tok, batch):
    """Decoded documents of a batch in row order."""
    out = []
    for b in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][b]
        out += [tok.decode(batch["inputs"][b, seg == k]) for k in range(1, seg.max() + 1)]
    return out


def _rendered(tok):
    """The N SFT records as the chat template renders them, in file order."""
    return [tok.decode(tok.encode(tk.USER + r["prompt"] + tk.ASSISTANT + r["response"]))
            for r in map(_record, range(N))]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for key in packing.BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_batches_train_only_responses(tok, sft_file):
    batch = next(iter(pipeline.make_sft_dataset([sft_file], tok, seq_len=96, batch_size=2, seed=0)))
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "inputs": ((2, 96), "int32"), "targets": ((2, 96), "int32"), "loss_mask": ((2, 96), "float32"),
        "segment_ids": ((2, 96), "int32"), "positions": ((2, 96), "int32")}
    assert batch["segment_ids"].max() > 1  # packed
    trained = batch["targets"][batch["loss_mask"] == 1]
    assistant, answer = tok.token_to_id("<|assistant|>"), tok.token_to_id("<answer>")
    assert tok.eos_id in trained and answer in trained and assistant not in trained
    # Every trained target lies after the <|assistant|> token of its own document.
    for b, t in zip(*np.nonzero(batch["loss_mask"])):
        doc = batch["inputs"][b][batch["segment_ids"][b] == batch["segment_ids"][b, t]]
        assert batch["positions"][b, t] >= list(doc).index(assistant)


def test_epochs_reshuffle_and_finish(tok, sft_file):
    ds = pipeline.make_sft_dataset([sft_file], tok, seq_len=96, batch_size=1, seed=3,
                                   num_epochs=2, pack=False)
    it = iter(ds)
    epochs, docs = [], []
    for batch in it:
        docs += _docs(tok, batch)
        epochs.append(it.epoch)
    first, second = docs[:N], docs[N:]
    assert len(docs) == 2 * N and sorted(first) == sorted(second)
    assert sorted(first) == sorted(_rendered(tok))
    assert first != second, "each epoch has its own order"
    assert epochs == [0] * N + [1] * N and it.metrics()["data/epoch"] == 1
    again = [d for b in pipeline.make_sft_dataset([sft_file], tok, seq_len=96, batch_size=1, seed=3,
                                                  num_epochs=2, pack=False) for d in _docs(tok, b)]
    assert again == docs, "the same seed gives the same order"
    ordered = pipeline.make_sft_dataset([sft_file], tok, seq_len=96, batch_size=1, seed=3,
                                        num_epochs=1, pack=False, shuffle=False)
    assert [d for b in ordered for d in _docs(tok, b)] == _rendered(tok)


def test_resume_mid_epoch_is_exact(tok, sft_file):
    def make():
        return pipeline.make_sft_dataset([sft_file], tok, seq_len=64, batch_size=2, seed=7)
    it = iter(make())
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(25)]  # crosses epoch boundaries
    assert it.epoch >= 2
    resumed = iter(make())
    resumed.set_state(state)
    _assert_same([next(resumed) for _ in range(25)], expected)
    assert resumed.epoch == it.epoch


def test_two_hosts_are_disjoint_and_cover(tok, sft_file):
    shards = []
    for index in range(2):
        ds = pipeline.make_sft_dataset([sft_file], tok, seq_len=96, batch_size=3, seed=0,
                                       num_epochs=1, process_index=index, process_count=2)
        shards.append([d for batch in ds for d in _docs(tok, batch)])
    assert len(shards[0]) == len(shards[1]) == N // 2
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == N
    with pytest.raises(ValueError, match="gets no records"):
        pipeline.make_sft_dataset([sft_file], tok, seq_len=96, batch_size=3, seed=0,
                                  process_index=30, process_count=31)


def test_pretraining_text_trains_every_token(tok, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"The cat sat {i} times."}) + "\n" for i in range(5)))
    ds = pipeline.make_sft_dataset([str(path)], tok, seq_len=128, batch_size=1, seed=0,
                                   text_field="text", num_epochs=1)
    (batch,) = list(ds)
    seg, mask = batch["segment_ids"][0], batch["loss_mask"][0]
    assert seg.max() == 5
    last_of_doc = np.append(seg[1:] != seg[:-1], True)
    np.testing.assert_array_equal(mask, ((seg > 0) & ~last_of_doc).astype(np.float32))


def _malformed_file(tmp_path):
    """Good records with one bad sample of each kind; returns (path, line of each kind)."""
    bad = {
        "bad_json": b'{"prompt": "x", "response": ',
        "missing_field": b'{"prompt": "x"}',
        "wrong_type": b'{"prompt": "x", "response": ["y"]}',
        "bad_utf8": b'{"prompt": "\xc3\x28", "response": "y"}',
        "too_long": json.dumps({"prompt": "x", "response": "long " * 200}).encode(),
    }
    lines, where = [], {}
    for i in range(N):
        lines.append(json.dumps(_record(i)).encode())
        if i % 4 == 1 and bad:
            kind, line = bad.popitem()
            lines.append(line)
            where[kind] = len(lines)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), where


def test_each_malformed_kind_raises_with_file_and_line(tok, tmp_path):
    path, where = _malformed_file(tmp_path)
    assert len(where) == 5
    for kind, line in where.items():
        one = tmp_path / f"{kind}.jsonl"
        one.write_bytes(open(path, "rb").read().split(b"\n")[line - 1] + b"\n")
        ds = pipeline.make_sft_dataset([str(one)], tok, seq_len=96, batch_size=1, seed=0)
        with pytest.raises(DataError) as info:
            next(iter(ds))
        assert (info.value.kind, info.value.path, info.value.line) == (kind, str(one), 1)
        assert str(info.value).startswith(f"{one}:1: ")
    with pytest.raises(DataError, match=r"mixed.jsonl:\d+: "):
        list(pipeline.make_sft_dataset([path], tok, seq_len=96, batch_size=1, seed=0, num_epochs=1))
    with pytest.raises(DataError, match="field 'prompt\\+response': expected at most seq_len=96"):
        next(iter(pipeline.make_sft_dataset([str(tmp_path / "too_long.jsonl")], tok, seq_len=96,
                                            batch_size=1, seed=0)))


def test_skipped_samples_are_counted_and_survive_resume(tok, tmp_path):
    path, where = _malformed_file(tmp_path)

    def make(num_epochs):
        return pipeline.make_sft_dataset([path], tok, seq_len=96, batch_size=2, seed=1,
                                         num_epochs=num_epochs, skip_malformed=True)
    it = iter(make(1))
    docs = [d for batch in it for d in _docs(tok, batch)]
    assert len(docs) == N
    metrics = it.metrics()
    assert {k: metrics[f"data/skipped_{k}"] for k in where} == dict.fromkeys(where, 1)
    assert metrics["data/skipped_total"] == 5
    assert sorted(metrics["data/skipped_at"].split("; ")) == sorted(f"{k}: {path}:{line}" for k, line in where.items())

    it = iter(make(None))
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(20)]
    resumed = iter(make(None))
    resumed.set_state(state)
    _assert_same([next(resumed) for _ in range(20)], expected)
    assert resumed.metrics() == it.metrics()
    assert it.epoch >= 1 and it.metrics()["data/skipped_total"] >= 5


def test_mixed_formats_in_one_dataset(tok, tmp_path, sft_file):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    parquet = str(tmp_path / "more.parquet")
    pq.write_table(pa.Table.from_pylist([_record(i) for i in range(N, N + 4)]), parquet)
    array_record = str(tmp_path / "more.array_record")
    writer = ArrayRecordWriter(array_record, "group_size:1")
    for i in range(N + 4, N + 8):
        writer.write(json.dumps({**_record(i), "system": "be brief"}).encode())
    writer.close()
    ds = pipeline.make_sft_dataset([sft_file, parquet, array_record], tok, seq_len=128,
                                   batch_size=4, seed=0, num_epochs=1)
    docs = [d for batch in ds for d in _docs(tok, batch)]
    assert len(docs) == N + 8
    assert sum(d.startswith(tk.SYSTEM + "be brief" + tk.USER) for d in docs) == 4
