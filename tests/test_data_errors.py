"""Bad data ends a run within seconds, saying how many records were skipped, why and where (file:line in the
user's own files): all-malformed, all-too-long and nothing-to-train sets, wrong field mappings caught by the
sample check before anything heavy, skips in a held-out split, SIGTERM during a search, and one CLI run."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import REPO, subprocess_env
from r1jax.data import fields, pipeline, sources, templates
from r1jax.data import tokenizer as tk
from r1jax.data.sources import AllSkippedError, DataError, StopRequested

N = 30


def gsm8k(i):
    """A GSM8K-shaped record: question / answer, the answer a worked solution ending in `#### n`."""
    return {"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have now?",
            "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}


def math_row(i):
    """A MATH-shaped record: problem / solution with \\boxed{}, level and type."""
    return {"problem": f"What is ${i} \\cdot 3$?", "solution": f"We have ${i} \\cdot 3 = \\boxed{{{3 * i}}}$.",
            "level": "Level 1", "type": "Prealgebra"}


def conversation(i, reply=True):
    """A conversational record: `messages`, a list of {role, content}."""
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} plus {i}?"}]
    return {"messages": turns + ([{"role": "assistant", "content": f"{2 * i}"}] if reply else [])}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    corpus = [json.dumps(r) for i in range(N) for r in (gsm8k(i), math_row(i), conversation(i))]
    return tk.train_sentencepiece(corpus, str(tmp_path_factory.mktemp("tok") / "tok"), 400)


@pytest.fixture(scope="module")
def tok(tok_path):
    return tk.load_tokenizer(tok_path)


@pytest.fixture(autouse=True)
def _no_hang():
    """A hang fails the test (SIGALRM) instead of stalling the suite (the library cases take < 1 s)."""
    def fail(signum, frame):
        raise TimeoutError("the data layer did not stop within 120 s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def write_lines(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return str(path)


def encode_chat(tok):
    """encode_messages for the tests: the project's chat template, the final assistant turn trained (a
    conversation without one trains nothing). Stages pass the checkpoint template's encoder (data/chat.py)."""
    def encode(messages):
        *context, last = messages
        if last["role"] != "assistant":
            tokens = np.asarray([tok.bos_id] + tok.encode(templates.render_prompt("chat", messages)), np.int32)
            return {"tokens": tokens, "loss_mask": np.zeros(len(tokens), np.int32)}
        return templates.encode_sft_example(tok, templates.render_prompt("chat", context), last["content"])
    return encode


def line_of(path, where):
    """The text of the line a `path:line` location names."""
    file, line = where.rsplit(":", 1)
    assert file == path
    return open(path, "rb").read().split(b"\n")[int(line) - 1]


# ---------------------------------------------------------------- whole sets unusable: an error, not a hang

def test_all_malformed_ends_with_counts_and_user_lines(tok, tmp_path):
    bad = [b'{"question": "q", "answer": ', b'{"question": "caf\xe9", "answer": "#### 1"}', b"[1, 2]",
           json.dumps({"question": "q", "answer": ["#### 1"]}).encode(), json.dumps({"question": "q"}).encode()]
    path = write_lines(tmp_path / "gsm8k.jsonl", [bad[i % 5] for i in range(N)])
    ds = pipeline.make_sft_dataset([path], tok, seq_len=256, batch_size=2, seed=0, skip_malformed=True,
                                   prompt_field="question", response_field="answer")  # repeats forever
    with pytest.raises(AllSkippedError) as info:
        next(iter(ds))
    e = info.value
    assert isinstance(e, DataError) and e.read == 2 * N  # two epochs' reads hold every record
    assert e.counts == {"bad_json": 24, "bad_utf8": 12, "wrong_type": 12, "missing_field": 12,
                        "too_long": 0, "no_target": 0}
    assert f"no usable record in {path} ({N} records)" in str(e)
    assert "bad_json: 24" in str(e) and "field 'answer': expected a str" in str(e)
    lines_of_kind = {"bad_json": {bad[0], bad[2]}, "bad_utf8": {bad[1]}, "wrong_type": {bad[3]},
                     "missing_field": {bad[4]}}
    assert set(e.locations) == set(lines_of_kind)
    for kind, where in e.locations.items():  # the user's own lines, the first 3 of each kind
        assert len(where) == 3 and {line_of(path, w) for w in where} <= lines_of_kind[kind]
    ds = pipeline.make_sft_dataset([path], tok, seq_len=256, batch_size=2, seed=0, skip_malformed=True,
                                   prompt_field="question", response_field="answer", max_skips_in_a_row=7)
    with pytest.raises(AllSkippedError, match=r"read 7 records, .*; stopped at max_skips_in_a_row=7"):
        next(iter(ds))
    # A finite stream ends with the same error, not with an empty StopIteration (rc=0 "data_exhausted").
    ds = pipeline.make_sft_dataset([path], tok, seq_len=256, batch_size=2, seed=0, skip_malformed=True,
                                   prompt_field="question", response_field="answer", num_epochs=1)
    with pytest.raises(AllSkippedError, match=r"read 30 records, skipped all of them"):
        list(ds)


def test_all_too_long_says_raise_seq_len(tok, tmp_path):
    path = write_lines(tmp_path / "math.jsonl", [math_row(i) for i in range(N)])
    ds = pipeline.make_sft_dataset([path], tok, seq_len=12, batch_size=4, seed=0, skip_malformed=True,
                                   prompt_field="problem", response_field="solution")
    with pytest.raises(AllSkippedError) as info:
        next(iter(ds))
    assert info.value.counts["too_long"] == 2 * N and sum(info.value.counts.values()) == 2 * N
    assert "expected at most seq_len=12 tokens" in str(info.value) and "raise data.seq_len" in str(info.value)
    assert all(line_of(path, w).startswith(b'{"problem"') for w in info.value.locations["too_long"])


def test_nothing_to_train_after_filtering(tok, tmp_path):
    """Conversations without an assistant turn are skipped as no_target; a set of only those stops."""
    path = write_lines(tmp_path / "chat.jsonl", [conversation(i, reply=False) for i in range(N)])
    ds = pipeline.make_sft_dataset([path], tok, seq_len=128, batch_size=2, seed=0, skip_malformed=True,
                                   messages_field="messages", encode_messages=encode_chat(tok), num_epochs=2)
    with pytest.raises(AllSkippedError, match="no_target") as info:
        next(iter(ds))
    assert info.value.counts["no_target"] == 2 * N and "needs an assistant turn" in str(info.value)
    # The RL / eval reader: a mapping that leaves no record ends with the counts too.
    gsm = write_lines(tmp_path / "gsm8k.jsonl", [gsm8k(i) for i in range(N)])
    records = sources.iterate_records([gsm], schema={"prompt": "str", "answer": "scalar"}, skip_malformed=True)
    with pytest.raises(AllSkippedError, match=r"missing_field \(30\)") as info:
        list(records)
    assert "the record's fields: 'question', 'answer'" in str(info.value)


# ---------------------------------------------------------------- partial skips: counted, located, never fatal

def test_partial_skips_name_user_lines_in_both_holdout_parts(tok, tmp_path):
    path = write_lines(tmp_path / "gsm8k.jsonl", [gsm8k(i) for i in range(N)])
    train, held_out = pipeline.holdout_split([path], n_eval=8, seed=2)
    assert len(train) == N - 8 and sorted(np.concatenate([train, held_out])) == list(range(N))
    broken = [*train[[1, 9]], *held_out[[0, 5]]]  # two records of each part; the split depends on counts only
    lines = [b'{"question": "broken' if i in broken else gsm8k(i) for i in range(N)]
    write_lines(tmp_path / "gsm8k.jsonl", lines)
    assert [list(p) for p in pipeline.holdout_split([path], n_eval=8, seed=2)] == [list(train), list(held_out)]
    bad_lines = {f"{path}:{i + 1}" for i in broken}
    seen = {}
    for name, part in (("train", train), ("eval", held_out)):
        it = iter(pipeline.make_sft_dataset([path], tok, seq_len=256, batch_size=2, seed=0, num_epochs=1,
                                            skip_malformed=True, prompt_field="question", response_field="answer",
                                            indices=part))
        docs = sum(int(b["segment_ids"].max(axis=1).sum()) for b in it)
        metrics = it.metrics()
        n_bad = len(bad_lines & {f"{path}:{i + 1}" for i in part})
        assert docs == len(part) - n_bad and metrics["data/skipped_bad_json"] == n_bad
        seen[name] = set(metrics["data/skipped_at"].removeprefix("bad_json: ").split(", "))
    assert seen["train"] | seen["eval"] == bad_lines  # the user's lines, not a shuffled copy's
    with pytest.raises(ValueError, match=f"data.eval_holdout=30: expected more than 0 and fewer than the 30 "
                                         f"records in {path}"):
        pipeline.holdout_split([path], n_eval=N, seed=0)


def test_messages_records_train_assistant_turns(tok, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [conversation(i) for i in range(N)])
    with pytest.raises(ValueError, match="needs encode_messages"):
        pipeline.make_sft_dataset([path], tok, seq_len=128, batch_size=2, seed=0, messages_field="messages")
    ds = pipeline.make_sft_dataset([path], tok, seq_len=128, batch_size=2, seed=0, num_epochs=1, shuffle=False,
                                   messages_field="messages", encode_messages=encode_chat(tok))
    batch = next(iter(ds))
    row = batch["inputs"][0][batch["segment_ids"][0] == 1]
    assert tok.decode(row) == tok.decode(tok.encode("<|system|>Be brief.<|user|>What is 0 plus 0?<|assistant|>0"))
    trained = batch["targets"][0][(batch["segment_ids"][0] == 1) & (batch["loss_mask"][0] == 1)]
    assert tok.decode(trained[:-1]) == "0" and trained[-1] == tok.eos_id


# ---------------------------------------------------------------- SIGTERM while searching

def test_sigterm_stops_a_long_search(tok, tmp_path):
    """A long run of unusable records: the SIGTERM handler's flag, polled through should_stop, ends it."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": 1}\n' * 200_000)
    flag = threading.Event()
    ds = pipeline.make_sft_dataset([str(path)], tok, seq_len=64, batch_size=2, seed=0, skip_malformed=True,
                                   prompt_field="question", response_field="answer", should_stop=flag.is_set,
                                   max_skips_in_a_row=10**9)
    sigterm = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        it = iter(ds)
        sigterm.start()
        start = time.perf_counter()
        with pytest.raises(StopRequested, match="stop requested while the data layer was skipping"):
            next(it)
        assert time.perf_counter() - start < 10
        assert 0 < it.metrics()["data/skipped_wrong_type"] < 200_000
    finally:
        sigterm.cancel()
        sigterm.join()  # never a SIGTERM after the default handler is back
        signal.signal(signal.SIGTERM, previous)


def test_stop_mid_batch_keeps_the_last_batch_state(tok, tmp_path):
    """Stopped while a batch is half built: the state (what the loop checkpoints) is the last batch's, so a
    resumed run trains exactly the batches an uninterrupted run trains; the same iterator continues too."""
    lines = [gsm8k(0), gsm8k(1), gsm8k(2)] + [b"{bad"] * 20 + [gsm8k(i) for i in range(3, 8)]
    path = write_lines(tmp_path / "gsm8k.jsonl", lines)
    stop = threading.Event()

    def make():
        return pipeline.make_sft_dataset([path], tok, seq_len=128, batch_size=2, seed=0, shuffle=False, pack=False,
                                         skip_malformed=True, prompt_field="question", response_field="answer",
                                         should_stop=stop.is_set)
    expected = list(zip(range(3), iter(make())))
    it = iter(make())
    first = next(it)  # records 0 and 1; record 2 is read and carried
    state = json.loads(json.dumps(it.get_state()))
    stop.set()
    with pytest.raises(StopRequested):
        next(it)  # record 2 placed, then the run of bad lines
    assert it.get_state() == state
    stop.clear()
    resumed = iter(make())
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    for batches in ([first, next(resumed), next(resumed)], [first, next(it), next(it)]):
        for (_, want), got in zip(expected, batches):
            np.testing.assert_array_equal(got["inputs"], want["inputs"])
    assert resumed.metrics()["data/skipped_bad_json"] == it.metrics()["data/skipped_bad_json"] == 20


# ---------------------------------------------------------------- the field mapping, checked on a sample

def test_sample_check_names_file_line_field_and_config_key(tmp_path):
    gsm = write_lines(tmp_path / "gsm8k.jsonl", [gsm8k(i) for i in range(N)])
    math = write_lines(tmp_path / "math.jsonl", [math_row(i) for i in range(N)])
    chat = write_lines(tmp_path / "chat.jsonl", [conversation(i) for i in range(N)])

    class Data(dict):  # a config's data block (ConfigDict has the same .get)
        pass

    rl = fields.FieldMap.from_config(Data(prompt_field="question", answer_field="answer", messages_field=None),
                                     "prompt", "answer", "messages", system="system")
    assert rl.schema() == {"question": "str", "answer": "scalar", "system": "str?"}
    assert fields.check_sample([gsm], rl) == N
    with pytest.raises(DataError) as info:  # MATH's reference is in `solution`
        fields.check_sample([gsm, math], fields.FieldMap(prompt="problem", answer="answer"))
    e = info.value
    assert (e.path, e.line, e.field, e.kind) == (gsm, 1, "problem", "missing_field")
    assert "mapped by data.prompt_field" in str(e) and "the record's fields: 'question', 'answer'" in str(e)
    with pytest.raises(DataError, match=rf"{math}:1: field 'answer': expected a str or a number .*"
                                        r"mapped by data.answer_field; all 30 records read"):
        fields.check_sample([math], fields.FieldMap(prompt="problem", answer="answer"))
    assert fields.check_sample([math], fields.FieldMap(prompt="problem", answer="solution")) == N

    sft = fields.FieldMap(prompt="prompt", response="response", messages="messages", system="system")
    assert sft.schema() == {"messages": "messages"} and fields.check_sample([chat], sft) == N
    broken = [conversation(i) for i in range(4)]
    broken[2]["messages"][1]["content"] = 7
    path = write_lines(tmp_path / "broken_chat.jsonl", broken)
    assert fields.check_sample([path], sft) == 4  # skipping on: one bad record is the skipping's job
    with pytest.raises(DataError, match=rf"{path}:3: field 'messages': expected a non-empty list of .*"
                                        r"got message 1: 'content' is int 7; mapped by data.messages_field"):
        fields.check_sample([path], sft, skip_malformed=False)


def test_sample_check_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "math.parquet")
    pq.write_table(pa.Table.from_pylist([math_row(i) for i in range(5)]), path)
    with pytest.raises(DataError, match=r"math.parquet row 0: field 'question'"):
        fields.check_sample([path], fields.FieldMap(prompt="question", response="solution"))
    text = fields.FieldMap(prompt="question", text="solution")  # pretraining reads only text
    assert text.schema() == {"solution": "str"} and fields.check_sample([path], text, per_file=2) == 2


# ---------------------------------------------------------------- the CLI: main's SFT stage

def test_cli_all_malformed_exits_nonzero_with_counts(tok_path, tmp_path):
    path = write_lines(tmp_path / "gsm8k.jsonl", [gsm8k(i) for i in range(N)])  # no prompt/response fields
    cmd = [sys.executable, "-m", "r1jax.main", "--config", "configs/sft.py:tiny", "--workdir", str(tmp_path / "w"),
           f"--config.data.train_files=('{path}',)", "--config.data.eval_holdout=0",
           f"--config.data.tokenizer={tok_path}",
           "--config.model.overrides.n_layers=1"]
    run = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=100)
    assert run.returncode != 0
    # The stage's sample check sees it before the model is built: one message, no traceback.
    assert f"error: DataError: {path}:1: field 'prompt': expected a str" in run.stderr
    assert f"mapped by data.prompt_field; all {N} records read from the start of this file are bad " \
           f"(missing_field: {N})" in run.stderr
    assert "Traceback" not in run.stderr
