"""Random-access record sources (JSONL, Parquet, ArrayRecord) and the record schema check.

A record is a dict. Every source has `__len__`, `__getitem__(i) -> dict` (grain's
RandomAccessDataSource protocol) and `location(i) -> (path, number, unit)`, where unit is "line"
(1-based line of a JSONL file) or "row" (0-based row / record index of the other formats), so
every error can say where the bad sample is.

Bad input raises `DataError` naming the file, the line or row, the field and what was expected.
Each error has a `kind` (one of `SKIP_KINDS`); when a pipeline runs with `skip_malformed=True` it
skips the sample and counts it under `data/skipped_<kind>` instead (`SkipTally`: the counts, the
first few file:line locations per kind, and the first message of each kind). A stream in which
every record is skipped never waits forever: it ends with `AllSkippedError` (a DataError) giving
the counts per reason and the first locations, always in the user's own files.

Schemas are data: a mapping from field name to a type name in `TYPE_CHECKS`, with a trailing "?"
for optional fields (missing or null allowed). Fields not in the schema pass through unchecked.
"""

from __future__ import annotations

import bisect
import json
import logging
import mmap
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Why a sample can be rejected; also the suffixes of the skip counters. "no_target": the record is
# well formed but leaves nothing to train on (a conversation without an assistant turn).
SKIP_KINDS = ("bad_utf8", "bad_json", "missing_field", "wrong_type", "too_long", "no_target")

# What to change when every record is skipped for one reason (the last line of AllSkippedError).
_SKIP_HINTS = {
    "bad_utf8": "the files must be UTF-8",
    "bad_json": "each line / record must be one JSON object",
    "missing_field": "map the fields to the records' names (data.prompt_field, data.response_field, "
                     "data.answer_field, data.messages_field, data.text_field)",
    "wrong_type": "check the data.*_field mapping: the named fields hold the wrong kind of value",
    "too_long": "raise data.seq_len or shorten the records",
    "no_target": "every conversation needs an assistant turn to train on",
}

Schema = Mapping[str, str]

# The record formats the synthetic world writes (DESIGN: data formats), by name for configs.
SCHEMAS: dict[str, dict[str, str]] = {
    "sft": {"prompt": "str", "response": "str", "system": "str?"},
    "text": {"text": "str"},
    "rl": {"prompt": "str", "answer": "str", "language": "str?"},
    "code": {"prompt": "str", "tests": "list[str]"},
    "preference": {"prompt": "str", "chosen": "str", "rejected": "str", "kind": "str?"},
}


class DataError(ValueError):
    """A malformed sample: where it is (path, line or row), which field, what was expected."""

    def __init__(self, kind: str, path: str, number: int, unit: str,
                 field: str | None, expected: str, got: str, hint: str = ""):
        assert kind in SKIP_KINDS, kind
        self.kind, self.path, self.number, self.unit = kind, path, number, unit
        self.field, self.expected, self.got, self.hint = field, expected, got, hint
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{self.where}: {what}expected {expected}, got {got}" + (f"; {hint}" if hint else ""))

    @property
    def line(self) -> int:
        """The 1-based line (JSONL) or the row index (other formats)."""
        return self.number

    @property
    def where(self) -> str:
        """`path:line` (JSONL) or `path row N` (other formats)."""
        return f"{self.path}:{self.number}" if self.unit == "line" else f"{self.path} row {self.number}"


class AllSkippedError(DataError):
    """Records were read but none was usable: the counts per reason and where the first ones are.

    `counts` maps each SKIP_KINDS kind to its count, `locations` each kind to its first few
    `file:line` locations; `read` is how many records were read."""

    def __init__(self, message: str, counts: Mapping[str, int], locations: Mapping[str, list[str]],
                 read: int):
        ValueError.__init__(self, message)
        self.kind, self.path, self.number, self.unit, self.field = None, None, None, None, None
        self.counts, self.locations, self.read = dict(counts), dict(locations), read


class StopRequested(Exception):
    """The caller's `should_stop()` returned True while the data layer was skipping records in search
    of a usable one: the training loop treats it as preemption (checkpoint what it has, then stop)."""


def skip_metrics(counts: Mapping[str, int]) -> dict[str, int]:
    """Skip counters as trainer metrics: `data/skipped_<kind>` for every kind, plus the total."""
    metrics = {f"data/skipped_{kind}": int(counts.get(kind, 0)) for kind in SKIP_KINDS}
    metrics["data/skipped_total"] = sum(metrics.values())
    return metrics


class SkipTally:
    """The records a reader skipped: counts per kind, the first `keep` locations of each kind and
    the first message of each kind. The first `keep` skips of each kind are also logged (WARNING),
    so a run's log says which file:line was dropped and why. JSON state for checkpoints."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self.counts = dict.fromkeys(SKIP_KINDS, 0)
        self.locations: dict[str, list[str]] = {}
        self.messages: dict[str, str] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, where: str, message: str) -> None:
        self.counts[kind] += 1
        seen = self.locations.setdefault(kind, [])
        if len(seen) < self.keep:
            seen.append(where)
            self.messages.setdefault(kind, message)
            log.warning("skipped a malformed record (%s #%d; data.skip_malformed): %s",
                        kind, self.counts[kind], message)

    def add_error(self, error: DataError) -> None:
        self.add(error.kind, error.where, str(error))

    def metrics(self) -> dict[str, Any]:
        """`skip_metrics`, plus `data/skipped_at` (e.g. "too_long: a.jsonl:3, a.jsonl:9; bad_json:
        b.jsonl:1") once anything was skipped."""
        metrics: dict[str, Any] = skip_metrics(self.counts)
        if self.locations:
            metrics["data/skipped_at"] = "; ".join(
                f"{kind}: {', '.join(where)}" for kind, where in self.locations.items())
        return metrics

    def state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "locations": {k: list(v) for k, v in self.locations.items()},
                "messages": dict(self.messages)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        counts = state.get("counts", state)  # an older checkpoint stored the bare counts
        self.counts = {kind: int(counts.get(kind, 0)) for kind in SKIP_KINDS}
        self.locations = {k: list(v) for k, v in state.get("locations", {}).items()}
        self.messages = dict(state.get("messages", {}))

    def error(self, read: int, what: str, note: str = "") -> AllSkippedError:
        """AllSkippedError: `read` records of `what` were read and every one was skipped."""
        kinds = [k for k in SKIP_KINDS if self.counts[k]]
        lines = [f"no usable record in {what}: read {read} records, skipped all of them ("
                 + ", ".join(f"{k}: {self.counts[k]}" for k in kinds) + ")" + (f"; {note}" if note else "")]
        for kind in kinds:
            lines.append(f"  {kind} ({self.counts[kind]}), e.g. at {', '.join(self.locations.get(kind, []))}"
                         f"\n    {self.messages.get(kind, '')}\n    -> {_SKIP_HINTS[kind]}")
        return AllSkippedError("\n".join(lines), self.counts, self.locations, read)


def _is_list_of(item_type: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(
        isinstance(x, item_type) and not isinstance(x, bool) for x in v
    )


TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "list[str]": _is_list_of(str),
    "list[int]": _is_list_of(int),
    "dict": lambda v: isinstance(v, dict),
    "scalar": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    "messages": lambda v: _messages_problem(v) is None,
    "any": lambda v: True,
}

# What the "expected" part of an error says for a type name (default: "a <type name>").
_EXPECTED = {
    "scalar": "a str or a number",
    "messages": "a non-empty list of {\"role\": str, \"content\": str} messages",
}


def _messages_problem(value: Any) -> str | None:
    """Why `value` is not a conversation (a non-empty list of {role, content} string dicts), or None."""
    if not isinstance(value, list):
        return _describe(value)
    if not value:
        return "an empty list"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i}: {_describe(message)}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {i}: {key!r} is {_describe(message.get(key)) if key in message else 'missing'}"
    return None


def _describe(value: Any) -> str:
    """A short description of a JSON value for error messages."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def check_schema(schema: Schema) -> None:
    """Fails early on a schema naming an unknown type (a config typo)."""
    for field, type_name in schema.items():
        if type_name.rstrip("?") not in TYPE_CHECKS:
            raise ValueError(
                f"schema field {field!r}: unknown type {type_name!r}; "
                f"expected one of {sorted(TYPE_CHECKS)} with an optional trailing '?'"
            )


def validate_record(record: Any, schema: Schema, path: str, number: int, unit: str) -> dict:
    """Returns `record` if it is a dict matching `schema`; raises DataError otherwise."""
    if not isinstance(record, dict):
        raise DataError("bad_json", path, number, unit, None, "a JSON object", _describe(record))
    for field, type_name in schema.items():
        optional = type_name.endswith("?")
        type_name = type_name.rstrip("?")
        value = record.get(field)
        if value is None:
            if optional:
                continue
            if field not in record:
                present = ", ".join(map(repr, list(record)[:12])) or "none"
                raise DataError("missing_field", path, number, unit, field,
                                f"{_EXPECTED.get(type_name, 'a ' + type_name)} (field is required)",
                                f"no such field (the record's fields: {present})")
        if not TYPE_CHECKS[type_name](value):
            got = _messages_problem(value) if type_name == "messages" else _describe(value)
            raise DataError("wrong_type", path, number, unit, field,
                            _EXPECTED.get(type_name, f"a {type_name}"), got)
    return record


def parse_json_bytes(raw: bytes, path: str, number: int, unit: str) -> Any:
    """Decodes one UTF-8 JSON document; DataError (bad_utf8 / bad_json) says where it broke."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError("bad_utf8", path, number, unit, None, "UTF-8 text",
                        f"invalid byte 0x{raw[e.start]:02x} at byte {e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError("bad_json", path, number, unit, None, "valid JSON",
                        f"{e.msg} at column {e.colno}") from None


class JsonlSource:
    """One JSON object per line. Line offsets are indexed once; `__getitem__` reads one line.

    Blank lines are not records but still count for line numbers. Reads use `os.pread` (no shared
    file position), so the source is safe to share between grain's reader threads and forked
    workers; a pickled copy reopens the file.
    """

    unit = "line"
    index_chunk = 1 << 26  # bytes scanned at a time: indexing never holds a large file's size in memory

    def __init__(self, path: str, head: int | None = None):
        """`head`: index (and read) only the first `head` records, without scanning the rest of the file."""
        self.path = path
        self._starts, self._ends, self._lines = self._index(path, head)
        self._fd = os.open(path, os.O_RDONLY)

    @classmethod
    def _index(cls, path: str, head: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = os.path.getsize(path)
        if size == 0:
            empty = np.zeros((0,), np.int64)
            return empty, empty, empty
        found, offset, need = [], 0, head  # need: how many lines to scan (None: all)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            while True:
                while offset < size and (need is None or sum(map(len, found)) <= need):
                    chunk = np.frombuffer(m, np.uint8, count=min(cls.index_chunk, size - offset), offset=offset)
                    found.append(np.flatnonzero(chunk == ord("\n")).astype(np.int64) + offset)
                    offset += len(chunk)
                    del chunk  # the mmap cannot close while a view on it is alive
                newlines = np.concatenate(found)
                if offset >= size:  # the whole file; its last line may lack the newline
                    starts, ends = np.concatenate([[0], newlines + 1]), np.concatenate([newlines, [size]])
                else:  # stopped early: the index ends with the last whole line scanned
                    starts, ends = np.concatenate([[0], newlines[:-1] + 1]), newlines
                starts, ends = starts.astype(np.int64), ends.astype(np.int64)
                # A line holding only whitespace is blank; only short lines can be.
                short = np.flatnonzero(ends - starts <= 8)
                keep = np.ones(len(starts), bool)
                keep[[i for i in short if not m[starts[i]:ends[i]].strip()]] = False
                if offset >= size or keep.sum() >= head:
                    break
                need *= 2  # blank lines: scan further
        lines = np.arange(1, len(starts) + 1, dtype=np.int64)
        return starts[keep][:head], ends[keep][:head], lines[keep][:head]

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fd=os.open(state["path"], os.O_RDONLY))

    def location(self, index: int) -> tuple[str, int, str]:
        return self.path, int(self._lines[index]), self.unit

    def __getitem__(self, index: int) -> Any:
        start, end = int(self._starts[index]), int(self._ends[index])
        raw = os.pread(self._fd, end - start, start)
        return parse_json_bytes(raw, self.path, int(self._lines[index]), self.unit)

    def __del__(self):
        if hasattr(self, "_fd"):
            os.close(self._fd)


class ParquetSource:
    """Rows of a Parquet file as dicts (pyarrow); the last row group read is cached."""

    unit = "row"

    def __init__(self, path: str):
        import pyarrow.parquet as pq  # noqa: PLC0415 (only Parquet users need pyarrow)

        self.path = path
        metadata = pq.ParquetFile(path).metadata
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self._cache: tuple[int, list[dict]] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._group_starts[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def location(self, index: int) -> tuple[str, int, str]:
        return self.path, index, self.unit

    def __getitem__(self, index: int) -> Any:
        import pyarrow.parquet as pq  # noqa: PLC0415

        group = bisect.bisect_right(self._group_starts, index) - 1
        with self._lock:
            if self._cache is None or self._cache[0] != group:
                rows = pq.ParquetFile(self.path).read_row_group(group).to_pylist()
                self._cache = (group, rows)
            rows = self._cache[1]
        return rows[index - self._group_starts[group]]


class ArrayRecordSource:
    """Records of an ArrayRecord file, each the UTF-8 JSON encoding of one dict."""

    unit = "row"

    def __init__(self, path: str):
        import grain  # noqa: PLC0415 (grain is only needed for this format here)

        self.path = path
        self._source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._source)

    def location(self, index: int) -> tuple[str, int, str]:
        return self.path, index, self.unit

    def __getitem__(self, index: int) -> Any:
        return parse_json_bytes(self._source[index], self.path, index, self.unit)


_SOURCE_BY_SUFFIX = {
    ".jsonl": JsonlSource,
    ".json": JsonlSource,
    ".parquet": ParquetSource,
    ".array_record": ArrayRecordSource,
    ".arrayrecord": ArrayRecordSource,
}


def open_source(path: str, head: int | None = None) -> JsonlSource | ParquetSource | ArrayRecordSource:
    """The source for one file, chosen by its suffix (a shard suffix like -00000-of-00008 is ok).
    `head`: a JSONL file is indexed only as far as its first `head` records (the other formats open
    without a scan anyway)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    name = re.sub(r"-\d+-of-\d+$", "", os.path.basename(path))
    for suffix, source_cls in _SOURCE_BY_SUFFIX.items():
        if name.endswith(suffix):
            return JsonlSource(path, head) if source_cls is JsonlSource else source_cls(path)
    raise ValueError(f"{path}: unknown data format; expected a suffix in {sorted(_SOURCE_BY_SUFFIX)}")


class ConcatSource:
    """Several files as one random-access source of records validated against `schema`."""

    def __init__(self, files: Sequence[str], schema: Schema):
        if not files:
            raise ValueError("no data files given")
        check_schema(schema)
        self.schema = dict(schema)
        self._sources = [open_source(f) for f in files]
        self._starts = np.concatenate(
            [[0], np.cumsum([len(s) for s in self._sources])]).astype(np.int64).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def _find(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        f = bisect.bisect_right(self._starts, index) - 1
        return self._sources[f], index - self._starts[f]

    def location(self, index: int) -> tuple[str, int, str]:
        source, local = self._find(index)
        return source.location(local)

    def __getitem__(self, index: int) -> dict:
        source, local = self._find(index)
        return validate_record(source[local], self.schema, *source.location(local))


class RecordIterator:
    """Validated records of files in order (this host's share); `skipped` counts what was dropped.

    For RL prompt sets and evaluation, which need the raw records (question, answer, tests,
    language...). With `skip_malformed=False` the first bad record raises DataError; with True bad
    records are skipped and tallied (`tally`, `metrics()`), and if every record of the share was
    skipped the iteration ends with AllSkippedError instead of yielding nothing.
    """

    def __init__(self, files: Sequence[str], schema: Schema, skip_malformed: bool,
                 process_index: int, process_count: int):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index}: expected 0 <= index < {process_count}")
        self.source = ConcatSource(files, schema)
        self.skip_malformed = skip_malformed
        self.indices = range(process_index, len(self.source), process_count)
        self.tally = SkipTally()
        self.files = list(files)

    @property
    def skipped(self) -> dict[str, int]:
        return self.tally.counts

    def __iter__(self) -> Iterator[dict]:
        used = 0
        for index in self.indices:
            try:
                record = self.source[index]
            except DataError as e:
                if not self.skip_malformed:
                    raise
                self.tally.add_error(e)
                continue
            used += 1
            yield record
        if used == 0 and self.tally.total:
            raise self.tally.error(len(self.indices), ", ".join(self.files))

    def metrics(self) -> dict[str, Any]:
        return self.tally.metrics()


def iterate_records(files: Sequence[str], *, schema: Schema | None = None,
                    skip_malformed: bool = False, process_index: int = 0,
                    process_count: int = 1) -> RecordIterator:
    """Iterates the records of `files` (a strided per-host share), validated against `schema`.

    `schema` defaults to no required fields (any JSON object). Iterate the result; read
    `.skipped` / `.metrics()` afterwards for the skip counts.
    """
    return RecordIterator(files, schema or {}, skip_malformed, process_index, process_count)
