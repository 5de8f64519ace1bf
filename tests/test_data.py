"""Templates, record sources (JSONL, Parquet, ArrayRecord), schema checks and iterate_records."""

import json
import pickle

import numpy as np
import pytest

from r1jax.data import sources, templates
from r1jax.data import tokenizer as tk
from r1jax.data.sources import DataError

RECORDS = [{"prompt": f"q{i}", "answer": str(i), "tests": [f"t{i}"], "language": "en"}
           for i in range(7)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = [f"What is {i} plus {i}? The answer is {2 * i}." for i in range(100)]
    return tk.load_tokenizer(
        tk.train_sentencepiece(corpus, str(tmp_path_factory.mktemp("tok") / "tok"), 300))


# ---------------------------------------------------------------- templates

def test_r1_zero_prompt():
    prompt = templates.r1_zero_prompt("What is 2+3?")
    assert prompt.startswith("A conversation between User and Assistant.")
    for phrase in ("first thinks about the reasoning process", "<think> </think>",
                   "<answer> </answer>"):
        assert phrase in prompt
    assert prompt.endswith("\nUser: What is 2+3?\nAssistant:")


def test_chat_prompt_and_messages():
    assert templates.chat_prompt("hi") == "<|user|>hi<|assistant|>"
    assert templates.chat_prompt("hi", system="be brief") == "<|system|>be brief<|user|>hi<|assistant|>"
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert templates.chat_prompt(conversation) == "<|system|>S<|user|>a<|assistant|>b<|user|>c<|assistant|>"
    assert templates.render_prompt("raw", "text") == "text"
    with pytest.raises(ValueError, match="field 'role'"):
        templates.chat_prompt([{"role": "bot", "content": "x"}])
    assert set(templates.TEMPLATES) >= {"r1_zero", "chat"}


def test_cold_start_format_and_parse():
    text = templates.format_cold_start("add 2 and 3", "5")
    assert text == "<|reasoning|>add 2 and 3<|summary|>5"
    assert templates.parse_cold_start(text) == ("add 2 and 3", "5")
    assert templates.parse_cold_start(" \n" + text) == ("add 2 and 3", "5")
    for bad in ("add<|summary|>5", "<|reasoning|>x", "<|summary|>5<|reasoning|>x",
                text + "<|summary|>again", "junk" + text):
        assert templates.parse_cold_start(bad) is None, bad


def test_encode_sft_example_trains_only_response(tok):
    prompt, response = templates.chat_prompt("What is 2 plus 2?"), "<answer>4</answer>"
    ex = templates.encode_sft_example(tok, prompt, response)
    tokens, mask = ex["tokens"], ex["loss_mask"]
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and len(tokens) == len(mask)
    assert tok.decode(tokens[mask == 0]) == prompt
    assert tok.decode(tokens[mask == 1]) == response
    assert mask[-1] == 1 and tokens[mask == 1][0] == tok.token_to_id("<answer>")
    assert np.all(np.diff(mask) >= 0), "the prompt comes first, then the response"
    with pytest.raises(ValueError, match=f"at most 5 tokens, got {len(tokens)}"):
        templates.encode_sft_example(tok, prompt, response, max_len=5)


# ---------------------------------------------------------------- sources

def _write_jsonl(path, lines):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return str(path)


def _write_parquet(path, records, row_group_size=3):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=row_group_size)
    return str(path)


def _write_array_record(path, payloads):
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for payload in payloads:
        writer.write(payload)
    writer.close()
    return str(path)


def test_each_source_type_reads_the_same_records(tmp_path):
    lines = [json.dumps(r) for r in RECORDS]
    jsonl = _write_jsonl(tmp_path / "a.jsonl", lines[:3] + ["", "  "] + lines[3:])
    parquet = _write_parquet(tmp_path / "a.parquet", RECORDS)
    array_record = _write_array_record(tmp_path / "a.array_record", [ln.encode() for ln in lines])
    for path in (jsonl, parquet, array_record):
        source = sources.open_source(path)
        assert len(source) == len(RECORDS)
        assert [source[i] for i in reversed(range(len(source)))] == RECORDS[::-1]
        assert pickle.loads(pickle.dumps(source))[2] == RECORDS[2]  # for grain worker processes
    assert sources.open_source(jsonl).location(3) == (jsonl, 6, "line")  # blank lines counted
    assert sources.open_source(parquet).location(4) == (parquet, 4, "row")
    both = sources.ConcatSource([jsonl, parquet], sources.SCHEMAS["rl"])
    assert len(both) == 14 and both[9] == RECORDS[2] and both.location(9) == (parquet, 2, "row")


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_jsonl_index_in_chunks_and_head(tmp_path, monkeypatch, trailing_newline):
    lines = [json.dumps(r) for r in RECORDS]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines[:2] + ["", " "] + lines[2:]) + ("\n" if trailing_newline else ""))
    whole = sources.JsonlSource(str(path))
    monkeypatch.setattr(sources.JsonlSource, "index_chunk", 5)  # lines straddle chunk boundaries
    chunked = sources.JsonlSource(str(path))
    assert [chunked[i] for i in range(len(chunked))] == [whole[i] for i in range(len(whole))] == RECORDS
    assert [chunked.location(i) for i in range(7)] == [whole.location(i) for i in range(7)]
    for head in (1, 3, 7, 50):
        first = sources.open_source(str(path), head=head)
        assert [first[i] for i in range(len(first))] == RECORDS[:head]
        assert [first.location(i)[1] for i in range(len(first))] == [1, 2, 5, 6, 7, 8, 9][:head]


def test_open_source_errors(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="a.csv: unknown data format"):
        sources.open_source(str(tmp_path / "a.csv"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.open_source(str(tmp_path / "nope.jsonl"))
    shard = _write_jsonl(tmp_path / "train.jsonl-00000-of-00002", ["{}"])
    assert isinstance(sources.open_source(shard), sources.JsonlSource)
    with pytest.raises(ValueError, match="unknown type 'strr'"):
        sources.ConcatSource([shard], {"prompt": "strr"})


MALFORMED = [
    # (line, kind, field, message fragment)
    (b'{"prompt": "a", "answer": "1"', "bad_json", None, "expected valid JSON"),
    (b'["prompt"]', "bad_json", None, "expected a JSON object, got list"),
    (b'{"answer": "1"}', "missing_field", "prompt", "field 'prompt': expected a str"),
    (b'{"prompt": 3, "answer": "1"}', "wrong_type", "prompt", "expected a str, got int 3"),
    (b'{"prompt": null, "answer": "1"}', "wrong_type", "prompt", "got null"),
    (b'{"prompt": "a", "answer": "1", "tests": ["x", 2]}', "wrong_type", "tests", "list[str]"),
    (b'{"prompt": "caf\xe9", "answer": "1"}', "bad_utf8", None, "invalid byte 0xe9"),
]


@pytest.mark.parametrize("line,kind,field,fragment", MALFORMED)
def test_malformed_jsonl_names_file_line_field(tmp_path, line, kind, field, fragment):
    schema = {"prompt": "str", "answer": "str", "tests": "list[str]?"}
    path = _write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "ok", "answer": "1"}', "", line])
    source = sources.ConcatSource([path], schema)
    with pytest.raises(DataError) as info:
        source[1]
    e = info.value
    assert (e.kind, e.path, e.line, e.field) == (kind, path, 3, field)
    assert str(e).startswith(f"{path}:3: ") and fragment in str(e)


def test_malformed_rows_in_parquet_and_array_record(tmp_path):
    parquet = _write_parquet(tmp_path / "p.parquet", [{"prompt": "a"}, {"prompt": None}])
    with pytest.raises(DataError, match=r"p.parquet row 1: field 'prompt': expected a str, got null"):
        sources.ConcatSource([parquet], {"prompt": "str"})[1]
    array_record = _write_array_record(tmp_path / "r.array_record", [b'{"prompt": "a"}', b"\xff{"])
    with pytest.raises(DataError, match=r"r.array_record row 1: expected UTF-8 text"):
        sources.ConcatSource([array_record], {"prompt": "str"})[1]


def test_iterate_records_validates_shards_and_counts_skips(tmp_path):
    lines = [json.dumps(r) for r in RECORDS]
    path = _write_jsonl(tmp_path / "rl.jsonl", lines[:2] + [b"{bad", b'{"answer": "1"}'] + lines[2:])
    with pytest.raises(DataError, match="rl.jsonl:3: expected valid JSON"):
        list(sources.iterate_records([path], schema=sources.SCHEMAS["rl"]))
    records = sources.iterate_records([path], schema=sources.SCHEMAS["rl"], skip_malformed=True)
    assert list(records) == RECORDS
    assert records.skipped["bad_json"] == 1 and records.skipped["missing_field"] == 1
    metrics = records.metrics()
    assert metrics["data/skipped_bad_json"] == 1 and metrics["data/skipped_total"] == 2
    shards = [list(sources.iterate_records([path], schema=sources.SCHEMAS["rl"], skip_malformed=True,
                                           process_index=i, process_count=3)) for i in range(3)]
    assert sorted((r["prompt"] for s in shards for r in s), key=lambda p: int(p[1:])) == \
        [r["prompt"] for r in RECORDS]
    with pytest.raises(ValueError, match="process_index=3"):
        sources.iterate_records([path], process_index=3, process_count=3)
