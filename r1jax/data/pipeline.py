"""SFT / pretraining input pipeline: files -> validated, tokenised, packed [B, T] batches.

    ds = make_sft_dataset(files, tokenizer, seq_len=T, batch_size=B, seed=0)
    it = iter(ds)
    batch = next(it)           # dict of numpy arrays, format in r1jax/data/packing.py
    state = it.get_state()     # JSON-serialisable; save it with the model checkpoint
    it.set_state(state)        # continue with exactly the batches that would have followed
    it.epoch, it.metrics()     # current epoch; data/skipped_<kind>, data/skipped_at, data/epoch, data/fill

    train, held_out = holdout_split(files, n_eval=64, seed=0)     # record indices of the same files
    make_sft_dataset(files, ..., indices=train)                   # errors still name the user's file:line

The grain graph, in order:
1. `MapDataset.range(N)` over the records of all files (or `.source(indices)`, a part), strided per host
   (`[process_index::process_count]`): hosts read disjoint shares that together cover the data.
2. `shuffle(seed)` then `repeat(num_epochs)`: grain reseeds the shuffle per epoch, so each epoch has
   its own order, the same on every run with the same seed.
3. `map_with_index(_Encoder)`: read and validate the record, render the prompt template (or, for a
   conversation, call the caller's `encode_messages`), tokenise, check the length; the epoch is the
   global index // host share size.
4. `to_iter_dataset` (a few reader threads, order preserved), `_SkipGuardDataset`, then
   `packing.PackedBatchDataset`.

Skips are counted where they cannot be lost. A malformed sample is not dropped inside the map
(which may run in reader threads or worker processes, whose counters would not survive); the
encoder turns it into a marker `{"skipped": kind, "where": "file:line", "why": message}` that flows
down the pipeline in order, and `_SkipGuardIterator`, in the consuming process, tallies and drops
it (sources.SkipTally: counts, first locations, a log line for the first few of each kind). The
tally is part of the iterator state, so after a restore it continues from the checkpointed values,
never counting a sample twice. With `skip_malformed=False` the DataError is raised instead.

Nothing waits forever. The guard counts the records skipped since the last usable one; after
`min(max_skips_in_a_row, 2 x host share)` of them (two shares' worth of reads hold a whole epoch,
whatever the shuffle, so then every record of the share is unusable), or when a finite stream ends
without a single usable record, it raises sources.AllSkippedError with the counts per reason and the
first file:line of each. While skipping it polls the caller's `should_stop()` and raises
sources.StopRequested when it says so (SIGTERM during a long search: the loop checkpoints and stops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from r1jax.data import packing, sources, templates
from r1jax.data.fields import FieldMap
from r1jax.data.sources import AllSkippedError, DataError, StopRequested, iterate_records  # noqa: F401 (public API)
from r1jax.data.tokenizer import Tokenizer

CHECKPOINT = "checkpoint"  # data.template: the checkpoint's own chat template (r1jax.data.chat.CHECKPOINT)

# encode_messages(messages) -> {"tokens": [n] int32, "loss_mask": [n] int32} (templates.encode_sft_example's
# format): a conversation rendered by a chat template, the assistant turns marked for training.
EncodeMessages = Callable[[list[dict]], dict[str, np.ndarray]]


class _Encoder:
    """Record index -> example dict, or a skip marker when the record is bad and skipping is on."""

    def __init__(self, source: sources.ConcatSource, tokenizer: Tokenizer, fields: FieldMap, *,
                 seq_len: int, template: str, encode_messages: EncodeMessages | None,
                 skip_malformed: bool, epoch_size: int):
        self.source, self.tokenizer, self.fields = source, tokenizer, fields
        self.seq_len, self.template, self.encode_messages = seq_len, template, encode_messages
        self.skip_malformed, self.epoch_size = skip_malformed, epoch_size
        used = fields.used()
        self.label = used.get("text") or used.get("messages") or f"{fields.prompt}+{fields.response}"

    def _example(self, record: dict, record_index: int, conversation: bool = False) -> dict:
        f = self.fields
        if f.text is not None:
            return templates.encode_sft_example(self.tokenizer, "", record[f.text])
        if f.messages is not None or conversation:
            field = f.messages or "messages"
            try:
                return self.encode_messages(record[field])
            except (ValueError, KeyError, TypeError) as e:  # the template refused the conversation
                raise DataError("wrong_type", *self.source.location(record_index), field,
                                "a conversation the chat template renders", f"{type(e).__name__}: {e}") from None
        system = record.get(f.system) if f.system else None
        if self.template == CHECKPOINT:  # one user turn and one assistant turn, through the chat template
            turns = [{"role": "user", "content": record[f.prompt]},
                     {"role": "assistant", "content": record[f.response]}]
            return self._example({f.messages or "messages": ([{"role": "system", "content": system}]
                                                              if system is not None else []) + turns},
                                 record_index, conversation=True)
        prompt = templates.render_prompt(self.template, record[f.prompt], system=system)
        return templates.encode_sft_example(self.tokenizer, prompt, record[f.response])

    def _encode(self, record_index: int) -> dict:
        example = self._example(self.source[record_index], record_index)
        if not np.any(example["loss_mask"]):
            raise DataError("no_target", *self.source.location(record_index), self.label,
                            "at least one trained token (an assistant turn)", "none")
        length = len(example["tokens"])
        if length > self.seq_len:
            raise DataError("too_long", *self.source.location(record_index), self.label,
                            f"at most seq_len={self.seq_len} tokens after tokenisation",
                            f"{length} tokens")
        return example

    def __call__(self, index: int, record_index: int) -> dict:
        epoch = index // self.epoch_size
        try:
            return {**self._encode(int(record_index)), "epoch": epoch}
        except DataError as e:
            if not self.skip_malformed:
                raise
            return {"skipped": e.kind, "where": e.where, "why": str(e), "epoch": epoch}


class _SkipGuardDataset(grain.IterDataset):
    """Drops skip markers and tallies them; stops a search that finds nothing (module docstring)."""

    def __init__(self, parent: grain.IterDataset, *, max_in_a_row: int, share: int, what: str,
                 should_stop: Callable[[], bool] | None):
        super().__init__(parent)
        self.limit = min(max_in_a_row, 2 * share)
        self.limit_note = ("" if self.limit == 2 * share else
                           f"stopped at max_skips_in_a_row={max_in_a_row}; later records may be usable")
        self.what, self.should_stop = what, should_stop

    def __iter__(self) -> _SkipGuardIterator:
        return _SkipGuardIterator(self._parent.__iter__(), self)


class _SkipGuardIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, config: _SkipGuardDataset):
        super().__init__(parent)
        self._config = config
        self.tally = sources.SkipTally()
        self.in_a_row = 0  # records skipped since the last usable one
        self.used = 0  # usable records returned, ever (restored with the state)

    @property
    def skipped(self) -> dict[str, int]:
        return self.tally.counts

    def __next__(self) -> dict:
        cfg = self._config
        while True:
            try:
                example = next(self._parent)
            except StopIteration:
                if self.used == 0 and self.tally.total:
                    raise self.tally.error(self.in_a_row, cfg.what) from None
                raise
            if "skipped" not in example:
                self.in_a_row, self.used = 0, self.used + 1
                return example
            self.tally.add(example["skipped"], example["where"], example["why"])
            self.in_a_row += 1
            if self.in_a_row >= cfg.limit:
                raise self.tally.error(self.in_a_row, cfg.what, cfg.limit_note)
            if cfg.should_stop is not None and cfg.should_stop():
                raise StopRequested(f"stop requested while the data layer was skipping records "
                                    f"({self.in_a_row} in a row without a usable one)")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "tally": self.tally.state(),
                "in_a_row": self.in_a_row, "used": self.used}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.tally.set_state(state.get("tally", state.get("skipped", {})))  # "skipped": older checkpoints
        self.in_a_row = int(state.get("in_a_row", 0))
        self.used = int(state.get("used", 1))  # an older checkpoint was written after a usable record

    def metrics(self) -> dict[str, Any]:
        return self.tally.metrics()


def holdout_split(files: Sequence[str], n_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) record indices of `files` (sorted): `n_eval` records drawn with `seed` are held out.

    Indices into the files' records in order, for make_sft_dataset(indices=...): nothing is copied, so
    errors and skips name the user's own file:line, and skip_malformed applies to both parts alike.
    Only the record counts are read (a JSONL file's line index)."""
    n = len(sources.ConcatSource(files, {}))
    if not 0 < n_eval < n:
        raise ValueError(f"data.eval_holdout={n_eval}: expected more than 0 and fewer than the {n} records "
                         f"in {_describe_files(list(files))}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def _describe_files(files: Sequence[str]) -> str:
    """"a.jsonl, b.jsonl" for error messages; a long file list is cut after three."""
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")


def make_sft_dataset(
    files: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    prompt_field: str = "prompt",
    response_field: str = "response",
    system_field: str = "system",
    text_field: str | None = None,
    messages_field: str | None = None,
    encode_messages: EncodeMessages | None = None,
    template: str = "chat",
    skip_malformed: bool = False,
    pack: bool = True,
    read_threads: int = 2,
    indices: Sequence[int] | np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_skips_in_a_row: int = 10_000,
) -> packing.PackedBatchDataset:
    """Packed [batch_size, seq_len] training batches from JSONL / Parquet / ArrayRecord files.

    SFT records give `prompt_field` (rendered with `template`, a name in templates.TEMPLATES, and
    the optional `system_field`) and `response_field`; only the response and EOS are trained.
    `template="checkpoint"`: the record becomes a conversation (system, user, assistant) encoded by
    `encode_messages` (the checkpoint's chat template; the assistant turn trained).
    With `messages_field` set, records are conversations encoded by `encode_messages` (the chat
    template's rendering, assistant turns trained); with `text_field` set, records are plain text
    and every token is trained (pretraining). `num_epochs=None` repeats forever. A sample longer
    than `seq_len` tokens is malformed (DataError, or skipped and counted as `too_long`).
    `indices`: the records to use (holdout_split), default all. `should_stop` / `max_skips_in_a_row`:
    see the module docstring.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}: expected 0 <= index < {process_count}")
    if template not in templates.TEMPLATES and template != CHECKPOINT:
        raise ValueError(f"template={template!r}: expected {CHECKPOINT!r} or one of {sorted(templates.TEMPLATES)}")
    if template == CHECKPOINT and text_field is None and encode_messages is None:
        raise ValueError(f"template={CHECKPOINT!r} needs encode_messages, the chat template's encoder of a "
                         "conversation (prompt/response records become one user and one assistant turn)")
    if messages_field is not None and text_field is None and encode_messages is None:
        raise ValueError(f"messages_field={messages_field!r} needs encode_messages, the chat template's "
                         f"encoder of a conversation")
    fields = FieldMap(prompt=prompt_field, response=response_field, system=system_field,
                      text=text_field, messages=messages_field)
    source = sources.ConcatSource(files, fields.schema())
    # range() is lazy: no index array for a corpus of a billion records.
    ds = grain.MapDataset.range(len(source)) if indices is None else grain.MapDataset.source(np.asarray(indices))
    ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records: "
                         f"{len(source)} records in {list(files)}")
    encoder = _Encoder(source, tokenizer, fields, seq_len=seq_len, template=template,
                       encode_messages=encode_messages, skip_malformed=skip_malformed,
                       epoch_size=len(ds))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map_with_index(encoder)
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size)
    examples = _SkipGuardDataset(ds.to_iter_dataset(read_options), should_stop=should_stop,
                                 max_in_a_row=max_skips_in_a_row, share=encoder.epoch_size,
                                 what=f"{_describe_files(list(files))} ({encoder.epoch_size} records"
                                      f"{' in this host share' if process_count > 1 else ''})")
    return packing.PackedBatchDataset(examples, seq_len=seq_len, batch_size=batch_size,
                                      pad_id=tokenizer.pad_id, pack=pack)
