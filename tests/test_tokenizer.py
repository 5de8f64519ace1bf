"""Tokenizer backends: SentencePiece training and round trips, the HF tokenizer.json backend, the CLI; a checkpoint's
own special tokens, EOS ids (generation_config.json) and chat template, against `transformers`."""

import json
import os
import pickle
import random

import pytest

from hf_fixtures import hf_checkpoints  # noqa: F401 (fixture)
from r1jax.data import tokenizer as tk

TRICKY = "<|user|>hi  there\n\tx<|assistant|><think>12+30</think> <answer>42</answer> 数学 ☃ é"


def _corpus(n=200, seed=0):
    rnd = random.Random(seed)
    words = ["apple", "seven", "plus", "equals", "wait", "the", "cat", "sat", "on", "mat", "数学"]
    return [
        " ".join(rnd.choice(words) for _ in range(10)) + f"\n{i} + {i + 1} = {2 * i + 1}"
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return tk.train_sentencepiece(_corpus(), str(tmp_path_factory.mktemp("tok") / "tok"), 320)


def test_training_is_deterministic_and_exact_size(sp_path, tmp_path):
    again = tk.train_sentencepiece(_corpus(), str(tmp_path / "again"), 320)
    with open(sp_path, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    tok = tk.load_tokenizer(sp_path)
    assert tok.vocab_size == 320
    with open(sp_path[:-len(".model")] + ".vocab", encoding="utf-8") as f:
        assert len(f.readlines()) == 320


def test_special_token_ids_and_atomic_encoding(sp_path):
    tok = tk.load_tokenizer(sp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    for i, special in enumerate(tk.USER_DEFINED_TOKENS, start=4):
        assert tok.token_to_id(special) == i
        assert tok.encode(special) == [i]  # one token, even for tags never seen in training
        assert tok.decode([i]) == special
    assert tok.encode("<answer>7</answer>")[0] == tok.token_to_id(tk.ANSWER_OPEN)
    with pytest.raises(KeyError, match="<nope>"):
        tok.token_to_id("<nope>")


def test_round_trip_and_control_tokens(sp_path):
    tok = tk.load_tokenizer(sp_path)
    ids = tok.encode(TRICKY)
    assert tok.decode(ids) == TRICKY
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == TRICKY
    # Control tokens cannot be injected through text.
    assert tok.eos_id not in tok.encode("</s><s><pad>")
    # Prompt and response encoded apart decode to their concatenation (no dummy prefix).
    assert tok.decode(tok.encode("a b") + tok.encode(" c")) == "a b c"
    assert tok.encode("123") == [tok.encode(d)[0] for d in "123"]  # digits split


def test_pickle_and_load_by_prefix(sp_path):
    tok = tk.load_tokenizer(sp_path[:-len(".model")])
    assert pickle.loads(pickle.dumps(tok)).encode(TRICKY) == tok.encode(TRICKY)


def test_bad_paths_and_sizes(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a SentencePiece"):
        tk.load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="vocab_size=100"):
        tk.train_sentencepiece(_corpus(), str(tmp_path / "small"), 100)
    with pytest.raises(ValueError, match="vocab_size=5000"):
        tk.train_sentencepiece(_corpus(20), str(tmp_path / "big"), 5000)


def test_cli_trains_from_jsonl(tmp_path):
    files = []
    for name, corpus in (("a", _corpus(60, 1)), ("b", _corpus(60, 2))):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "n": 1}) + "\n" for t in corpus))
        files.append(str(path))
    out = tmp_path / "out" / "tok"
    tk.main(["--input", ",".join(files), "--field", "text", "--vocab_size", "300", "--output", str(out)])
    tok = tk.load_tokenizer(str(out) + ".model")
    assert tok.vocab_size == 300 and tok.decode(tok.encode(TRICKY)) == TRICKY
    with pytest.raises(SystemExit, match="no text found"):
        tk.main(["--input", files[0], "--field", "missing", "--output", str(tmp_path / "x")])


def _save_hf_tokenizer(directory, with_config=True):
    """A tiny byte-level BPE built with the `tokenizers` library, saved like an HF checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>", *tk.USER_DEFINED_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(_corpus(), trainer)
    os.makedirs(directory, exist_ok=True)
    hf.save(os.path.join(directory, "tokenizer.json"))
    if with_config:
        config = {"bos_token": "<|bos|>", "eos_token": {"content": "<|eos|>"}, "pad_token": None}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return hf


def test_hf_tokenizer_json_backend(tmp_path):
    hf = _save_hf_tokenizer(tmp_path / "ckpt")
    tok = tk.load_tokenizer(str(tmp_path / "ckpt"))
    assert isinstance(tok, tk.HFTokenizer)
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    assert (tok.bos_id, tok.eos_id) == (hf.token_to_id("<|bos|>"), hf.token_to_id("<|eos|>"))
    assert tok.pad_id == tok.eos_id  # no pad token in the config: pad with EOS
    ids = tok.encode(TRICKY)
    assert tok.token_to_id(tk.ANSWER_OPEN) in ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == TRICKY
    assert isinstance(tk.load_tokenizer(str(tmp_path / "ckpt" / "tokenizer.json")), tk.HFTokenizer)


def test_hf_tokenizer_without_eos_is_an_error(tmp_path):
    _save_hf_tokenizer(tmp_path / "ckpt", with_config=False)  # no config and no "</s>" token
    with pytest.raises(ValueError, match="no EOS token"):
        tk.load_tokenizer(str(tmp_path / "ckpt"))


# ------------------------------------------------------------------ the checkpoint is the source of truth


def test_checkpoint_tokens_eos_ids_and_template(hf_checkpoints):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    from hf_fixtures import LLAMA3_TEMPLATE, QWEN25_TEMPLATE

    for family, template in (("qwen2", QWEN25_TEMPLATE), ("llama3", LLAMA3_TEMPLATE)):
        path = hf_checkpoints(family)
        tok, theirs = tk.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
        generation = transformers.GenerationConfig.from_pretrained(path)
        assert tok.chat_template == template == theirs.chat_template
        assert tok.bos_id == theirs.bos_token_id and tok.eos_id == theirs.eos_token_id
        assert tok.eos_ids == tuple(dict.fromkeys([theirs.eos_token_id, *generation.eos_token_id]))
        assert len(tok.eos_ids) == 2
        assert tok.special_tokens == {k: v for k, v in theirs.special_tokens_map.items() if isinstance(v, str)}
        assert tok.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else tok.eos_id)
        text = "<think> 48/2 = 24 </think> <answer> 24 </answer>"
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text) + list(tok.eos_ids)) == text  # every EOS id is a control token
    llama = tk.load_tokenizer(hf_checkpoints("llama3"))
    assert [llama.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>")] == list(llama.eos_ids)


def test_checkpoint_token_files_in_other_shapes(hf_checkpoints, tmp_path):  # noqa: F811
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints("qwen2"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    # a list of named templates (older multi-template checkpoints): the "default" one
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert tk.load_tokenizer(str(path)).chat_template == "D"
    (path / "chat_template.jinja").write_text("J")  # the separate file wins, as in transformers
    assert tk.load_tokenizer(str(path)).chat_template == "J"
    # one int in generation_config.json; none at all: config.json's eos_token_id
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert tk.load_tokenizer(str(path)).eos_ids == (2, 0)
    (path / "generation_config.json").unlink()
    assert tk.load_tokenizer(str(path)).eos_ids == (2,)  # config.json's eos_token_id is <|im_end|> itself
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["<|im_end|>"]}))
    with pytest.raises(ValueError, match="generation_config.json: field 'eos_token_id': expected an int"):
        tk.load_tokenizer(str(path))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10**6]}))
    with pytest.raises(ValueError, match=r"eos_token_id \[1000000\] outside the vocabulary"):
        tk.load_tokenizer(str(path))
