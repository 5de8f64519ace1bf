"""Tokenizers: one interface, two backends (SentencePiece and Hugging Face `tokenizer.json`).

The tiny runs train their own SentencePiece model with the project's special tokens reserved;
imported Hugging Face checkpoints bring their own `tokenizer.json`. Both sit behind `Tokenizer`,
and `load_tokenizer(path)` picks the backend from what the path is.

A Hugging Face checkpoint is the source of truth for its own tokens: `HFTokenizer` reads BOS / EOS / PAD
from `tokenizer_config.json`, every stop id from `generation_config.json` (`eos_ids`: Llama-3-Instruct and
Qwen2.5-Instruct stop on two ids) and the chat template (`chat_template`, rendered by r1jax.data.chat).

Special tokens. BOS, EOS and PAD are control tokens: they are never produced from text (a user
typing "</s>" cannot end a sequence) and `decode` drops them. The chat roles, the cold-start
markers and the R1-Zero tags are atomic user-defined pieces: `encode` turns each occurrence in the
text into one id and `decode` gives the literal string back, so rewards can find `<answer>` in a
decoded completion and the tiny model sees each tag as a single token.

Train a tokenizer for a tiny run (fields are comma-separated; records lacking a field are ignored):

    python -m r1jax.data.tokenizer --input a.jsonl,b.jsonl --field text --vocab_size 512 \
        --output DIR/tok

writes DIR/tok.model (load it with `load_tokenizer("DIR/tok.model")` or `load_tokenizer("DIR/tok")`)
and DIR/tok.vocab (one piece and its score per line, for reading).
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import sentencepiece as spm

from r1jax.data import sources

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
REASONING, SUMMARY = "<|reasoning|>", "<|summary|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Atomic pieces matched in text, in id order after the control tokens (ids 4..12 in our models).
USER_DEFINED_TOKENS = (
    USER, ASSISTANT, SYSTEM, REASONING, SUMMARY,
    THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE,
)
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS) + USER_DEFINED_TOKENS


class Tokenizer(Protocol):
    """What the data pipeline, the sampler and the rewards need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def eos_ids(self) -> tuple[int, ...]: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def special_tokens(self) -> dict[str, str]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_to_id(self, token: str) -> int: ...


class SentencePieceTokenizer:
    """A SentencePiece `.model` (the tiny runs' own tokenizer, see `train_sentencepiece`)."""

    def __init__(self, model_proto: bytes, path: str = "<memory>"):
        self.path, self._proto = path, model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._control = frozenset(
            i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)
        )

    def __reduce__(self):  # picklable for grain worker processes
        return SentencePieceTokenizer, (self._proto, self.path)

    @classmethod
    def from_file(cls, path: str) -> SentencePieceTokenizer:
        with open(path, "rb") as f:
            return cls(f.read(), path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    @property
    def pad_id(self) -> int:
        # Models trained without a pad piece pad with EOS; padded positions are masked anyway.
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    @property
    def chat_template(self) -> str | None:
        return None  # the tiny runs name their template in the config (r1jax.data.templates)

    @property
    def special_tokens(self) -> dict[str, str]:
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id,
               "unk_token": self._sp.unk_id()}
        return {k: self._sp.id_to_piece(i) for k, i in ids.items() if i is not None and i >= 0}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in self._control])

    def token_to_id(self, token: str) -> int:
        i = self._sp.piece_to_id(token)
        if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
            raise KeyError(f"{self.path}: special token {token!r} is not in the vocabulary")
        return i


def _special_from_config(config: dict, key: str) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or null."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _ids_field(config: dict, key: str, where: str) -> list[int]:
    """An `eos_token_id`-like field: an int, a list of ints, or absent/null ([])."""
    value = config.get(key)
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where}: field {key!r}: expected an int or a list of ints, got {value!r}")
    return values


def read_chat_template(directory: str) -> str | None:
    """The checkpoint's chat template: `chat_template.jinja` when present (transformers >= 4.43 writes it there and
    prefers it), else tokenizer_config.json's `chat_template` (a string, or a list of {name, template} from which
    the one named "default" is taken); None when the checkpoint has none (a base model)."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    where = os.path.join(directory, "tokenizer_config.json")
    template = _read_json(where).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{where}: field 'chat_template': expected a Jinja string (or a list of {{name, template}} "
                         f"with a 'default' entry), got {type(template).__name__}")
    return template


class HFTokenizer:
    """A Hugging Face checkpoint's tokenizer: `tokenizer.json` (via the `tokenizers` library) and the files
    beside it, read as `transformers` reads them.

    - BOS / EOS / PAD / UNK: `tokenizer_config.json` (or `special_tokens_map.json`); the project's names when
      neither file exists. A checkpoint without a BOS (Qwen) has `bos_id` None; one without a PAD pads with EOS.
    - `eos_ids`: every id that ends a generation, in order, deduplicated: the tokenizer's EOS, then each id of
      `generation_config.json`'s `eos_token_id` (an int or a list; config.json's when there is no
      generation_config.json). `eos_id` is the first.
    - `chat_template`: see read_chat_template; `special_tokens` ({"bos_token": "<|begin_of_text|>", ...}) are the
      variables a chat template sees.
    """

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as _HFTokenizerModel  # noqa: PLC0415 (optional backend)

        self.directory = directory
        self.path = os.path.join(directory, "tokenizer.json")
        self._tok = _HFTokenizerModel.from_file(self.path)
        config: dict = {}
        for config_name in ("special_tokens_map.json", "tokenizer_config.json"):
            config.update(_read_json(os.path.join(directory, config_name)))
        defaults = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None}
        names = {k: _special_from_config(config, k) if config else v for k, v in defaults.items()}
        self._names = {k: v for k, v in names.items() if v is not None and self._tok.token_to_id(v) is not None}
        self._bos = self._tok.token_to_id(names["bos_token"]) if names["bos_token"] else None
        eos = self._tok.token_to_id(names["eos_token"]) if names["eos_token"] else None
        generation = os.path.join(directory, "generation_config.json")
        if not os.path.exists(generation):
            generation = os.path.join(directory, "config.json")
        stop = _ids_field(_read_json(generation), "eos_token_id", generation)
        if eos is None and not stop:
            raise ValueError(
                f"{self.path}: no EOS token: expected 'eos_token' in tokenizer_config.json "
                f"naming a token of the vocabulary, 'eos_token_id' in generation_config.json, or a {EOS!r} token"
            )
        self._eos_ids = tuple(dict.fromkeys(([] if eos is None else [eos]) + stop))
        vocab = self.vocab_size
        bad = [i for i in self._eos_ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{generation}: eos_token_id {bad} outside the vocabulary of {self.path} ({vocab} tokens)")
        pad = self._tok.token_to_id(names["pad_token"]) if names["pad_token"] else None
        self._pad = self._eos_ids[0] if pad is None else pad
        self._chat_template = read_chat_template(directory)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos_ids[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._names)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        control = {self._bos, self._pad, *self._eos_ids}
        kept = [int(i) for i in ids if int(i) not in control]
        return self._tok.decode(kept, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.path}: special token {token!r} is not in the vocabulary")
        return i


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a tokenizer from a `.model` file, a prefix of one, a `tokenizer.json` or its directory."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
        return HFTokenizer(path)
    if os.path.basename(path) == "tokenizer.json" and os.path.isfile(path):
        return HFTokenizer(os.path.dirname(path) or ".")
    if path.endswith(".model") and os.path.isfile(path):
        return SentencePieceTokenizer.from_file(path)
    if os.path.isfile(path + ".model"):
        return SentencePieceTokenizer.from_file(path + ".model")
    raise FileNotFoundError(
        f"{path}: expected a SentencePiece .model file (or its prefix), a tokenizer.json, "
        "or a directory holding tokenizer.json"
    )


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """SentencePiece trains on lines: split texts at newlines and cut very long lines."""
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), max_chars):
                yield line[start:start + max_chars]


def train_sentencepiece(
    texts: Iterable[str],
    out_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    seed: int = 0,
) -> str:
    """Trains a SentencePiece model on `texts` and writes `{out_prefix}.model` and `.vocab`.

    Deterministic (one thread, no sentence sampling, fixed seed): the same texts give the same
    bytes. Byte fallback is on, so any text encodes without <unk>; text is not normalised and no
    dummy prefix is added, so `decode(encode(s)) == s` and a prompt and its response can be
    encoded separately. Ids: 0 PAD, 1 UNK, 2 BOS, 3 EOS, then `USER_DEFINED_TOKENS`.
    Returns the path of the .model file.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size}: expected at least {256 + len(SPECIAL_TOKENS)} "
            "(256 byte-fallback pieces plus the special tokens)"
        )
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_chars=4096),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            user_defined_symbols=list(USER_DEFINED_TOKENS),
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=character_coverage,
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"training {out_prefix}.model with vocab_size={vocab_size}: {e}") from e
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    model_path = out_prefix + ".model"
    with open(model_path, "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(out_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return model_path


def texts_from_files(files: Sequence[str], fields: Sequence[str]) -> Iterator[str]:
    """The string values of `fields` in every record of `files` (records lacking a field skip it)."""
    schema = {field: "str?" for field in fields}
    for record in sources.iterate_records(files, schema=schema):
        for field in fields:
            if record.get(field):
                yield record[field]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a SentencePiece tokenizer for tiny runs.")
    parser.add_argument("--input", required=True, help="comma-separated JSONL/Parquet/ArrayRecord files")
    parser.add_argument("--field", default="text", help="comma-separated string fields to train on")
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--output", required=True, help="output prefix: writes OUTPUT.model, OUTPUT.vocab")
    args = parser.parse_args(argv)
    files = [f for f in args.input.split(",") if f]
    fields = [f for f in args.field.split(",") if f]
    texts = list(texts_from_files(files, fields))
    if not texts:
        raise SystemExit(f"no text found in fields {fields} of {files}")
    path = train_sentencepiece(texts, args.output, args.vocab_size, model_type=args.model_type)
    print(f"wrote {path} ({args.vocab_size} pieces from {len(texts)} texts)")


if __name__ == "__main__":
    main()
