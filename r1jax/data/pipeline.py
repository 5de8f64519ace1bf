"""SFT / pretraining input pipeline: files -> validated, tokenised, packed [B, T] batches.

    ds = make_sft_dataset(files, tokenizer, seq_len=T, batch_size=B, seed=0)
    it = iter(ds)
    batch = next(it)           # dict of numpy arrays, format in r1jax/data/packing.py
    state = it.get_state()     # JSON-serialisable; save it with the model checkpoint
    it.set_state(state)        # continue with exactly the batches that would have followed
    it.epoch, it.metrics()     # current epoch; data/skipped_<kind>, data/epoch, data/fill

The grain graph, in order:
1. `MapDataset.range(N)` over the records of all files, strided per host
   (`[process_index::process_count]`): hosts read disjoint shares that together cover the data.
2. `shuffle(seed)` then `repeat(num_epochs)`: grain reseeds the shuffle per epoch, so each epoch has
   its own order, the same on every run with the same seed.
3. `map_with_index(_Encoder)`: read and validate the record, render the prompt template, tokenise,
   check the length; the epoch is the global index // host share size.
4. `to_iter_dataset` (a few reader threads, order preserved), `_SkipCountingDataset`, then
   `packing.PackedBatchDataset`.

Skips are counted where they cannot be lost. A malformed sample is not dropped inside the map
(which may run in reader threads or worker processes, whose counters would not survive); the
encoder turns it into a marker `{"skipped": kind}` that flows down the pipeline in order, and
`_SkipCountingDataset`, in the consuming process, counts and drops it. The counts are part of the
iterator state, so after a restore they continue from the checkpointed values, never counting a
sample twice. With `skip_malformed=False` the DataError is raised instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain

from r1jax.data import packing, sources, templates
from r1jax.data.sources import DataError, iterate_records  # noqa: F401 (public API here too)
from r1jax.data.tokenizer import Tokenizer


class _Encoder:
    """Record index -> example dict, or a skip marker when the record is bad and skipping is on."""

    def __init__(self, source: sources.ConcatSource, tokenizer: Tokenizer, *, seq_len: int,
                 template: str, prompt_field: str, response_field: str, system_field: str,
                 text_field: str | None, skip_malformed: bool, epoch_size: int):
        self.source, self.tokenizer, self.seq_len, self.template = source, tokenizer, seq_len, template
        self.prompt_field, self.response_field = prompt_field, response_field
        self.system_field, self.text_field = system_field, text_field
        self.skip_malformed, self.epoch_size = skip_malformed, epoch_size

    def _encode(self, record_index: int) -> dict:
        record = self.source[record_index]
        if self.text_field is not None:
            example = templates.encode_sft_example(self.tokenizer, "", record[self.text_field])
        else:
            prompt = templates.render_prompt(self.template, record[self.prompt_field],
                                             system=record.get(self.system_field))
            example = templates.encode_sft_example(self.tokenizer, prompt, record[self.response_field])
        length = len(example["tokens"])
        if length > self.seq_len:
            fields = self.text_field or f"{self.prompt_field}+{self.response_field}"
            raise DataError("too_long", *self.source.location(record_index), fields,
                            f"at most seq_len={self.seq_len} tokens after tokenisation",
                            f"{length} tokens")
        return example

    def __call__(self, index: int, record_index: int) -> dict:
        epoch = index // self.epoch_size
        try:
            return {**self._encode(record_index), "epoch": epoch}
        except DataError as e:
            if not self.skip_malformed:
                raise
            return {"skipped": e.kind, "epoch": epoch}


class _SkipCountingDataset(grain.IterDataset):
    """Drops skip markers and counts them by kind; the counts are part of the iterator state."""

    def __iter__(self) -> _SkipCountingIterator:
        return _SkipCountingIterator(self._parent.__iter__())


class _SkipCountingIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.skipped = dict.fromkeys(sources.SKIP_KINDS, 0)

    def __next__(self) -> dict:
        while True:
            example = next(self._parent)
            if "skipped" not in example:
                return example
            self.skipped[example["skipped"]] += 1

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": dict(self.skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.skipped = {kind: int(state["skipped"].get(kind, 0)) for kind in sources.SKIP_KINDS}

    def metrics(self) -> dict[str, int]:
        return sources.skip_metrics(self.skipped)


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
    template: str = "chat",
    skip_malformed: bool = False,
    pack: bool = True,
    read_threads: int = 2,
) -> packing.PackedBatchDataset:
    """Packed [batch_size, seq_len] training batches from JSONL / Parquet / ArrayRecord files.

    SFT records give `prompt_field` (rendered with `template`, a name in templates.TEMPLATES, and
    the optional `system_field`) and `response_field`; only the response and EOS are trained.
    With `text_field` set, records are plain text and every token is trained (pretraining).
    `num_epochs=None` repeats forever. A sample longer than `seq_len` tokens is malformed
    (DataError, or skipped and counted as `too_long`).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}: expected 0 <= index < {process_count}")
    if template not in templates.TEMPLATES:
        raise ValueError(f"template={template!r}: expected one of {sorted(templates.TEMPLATES)}")
    if text_field is not None:
        schema = {text_field: "str"}
    else:
        schema = {prompt_field: "str", response_field: "str", system_field: "str?"}
    source = sources.ConcatSource(files, schema)
    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records: "
                         f"{len(source)} records in {list(files)}")
    encoder = _Encoder(source, tokenizer, seq_len=seq_len, template=template,
                       prompt_field=prompt_field, response_field=response_field,
                       system_field=system_field, text_field=text_field,
                       skip_malformed=skip_malformed, epoch_size=len(ds))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map_with_index(encoder)
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size)
    examples = _SkipCountingDataset(ds.to_iter_dataset(read_options))
    return packing.PackedBatchDataset(examples, seq_len=seq_len, batch_size=batch_size,
                                      pad_id=tokenizer.pad_id, pack=pack)
