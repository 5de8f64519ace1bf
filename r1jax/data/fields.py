"""Data mapping: which record fields a stage reads, the type each must have, and the check of a sample
of the records that runs before anything heavy (model, tokenizer, compilation).

    fields = FieldMap.from_config(config.data, "prompt", "answer", "messages", system="system")
    schema = fields.schema()                  # e.g. {"question": "str", "answer": "scalar", "system": "str?"}
    check_sample(files, fields, skip_malformed=config.data.skip_malformed)   # seconds; DataError if bad

The config keys (each optional: None, or absent from the config, means "not read"):

  data.prompt_field    the question / instruction, a str (RL prompts; SFT with response_field)
  data.response_field  the trained target of prompt/response SFT, a str
  data.answer_field    the reward's reference answer: a str or a number, in any form real sets use
                       (GSM8K's worked answer ending in "#### 42", MATH's solution with \\boxed{}, a bare
                       answer); the reward extracts the answer, the data layer only checks the type
  data.messages_field  a conversation: a non-empty list of {"role": str, "content": str}. SFT trains the
                       assistant turns; it replaces prompt_field and response_field
  data.system_field    an optional system prompt (a str, missing or null)
  data.text_field      plain text with every token trained (pretraining); replaces all the others

`check_sample` reads the first `per_file` records of every file and validates them against the schema. It
fails with the file:line, the field, its config key and the expected type when the mapping cannot be
right: with `skip_malformed=False` at the first bad record; with `skip_malformed=True` when *every*
sampled record of a file is bad (a wrong field name or type fails for all of them; a few broken records
are the skipping's job, counted in the run's metrics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from r1jax.data import sources
from r1jax.data.sources import DataError

# FieldMap attribute -> (config key, type name in sources.TYPE_CHECKS).
FIELDS: dict[str, tuple[str, str]] = {
    "prompt": ("data.prompt_field", "str"),
    "response": ("data.response_field", "str"),
    "answer": ("data.answer_field", "scalar"),
    "messages": ("data.messages_field", "messages"),
    "system": ("data.system_field", "str?"),
    "text": ("data.text_field", "str"),
}


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Record field names a stage reads (None: not read). See the module docstring."""

    prompt: str | None = None
    response: str | None = None
    answer: str | None = None
    messages: str | None = None
    system: str | None = None
    text: str | None = None

    @classmethod
    def from_config(cls, data: Any, *names: str, **defaults: str) -> FieldMap:
        """The `names` (e.g. "prompt", "answer") of a config's data block, read from `data.<name>_field`;
        a key the config lacks takes its value from `defaults` (e.g. system="system"), and None (or an
        unset placeholder) leaves the field unread."""
        unknown = (set(names) | set(defaults)) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown data fields {sorted(unknown)}; expected some of {sorted(FIELDS)}")
        getter = data.get if hasattr(data, "get") else lambda key, default: getattr(data, key, default)
        return cls(**{name: getter(f"{name}_field", defaults.get(name)) or None
                      for name in (*names, *defaults)})

    def used(self) -> dict[str, str]:
        """{attribute: record field} of the fields actually read: `text` replaces all others, `messages`
        replaces prompt, response and system (the conversation carries them)."""
        chosen = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if "text" in chosen:
            return {"text": chosen["text"]}
        if "messages" in chosen:
            return {k: v for k, v in chosen.items() if k in ("messages", "answer")}
        return chosen

    def schema(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The record schema (sources.validate_record) of the fields read, plus `extra` (e.g. code tests)."""
        schema = {name: FIELDS[attr][1] for attr, name in self.used().items()}
        return {**schema, **(extra or {})}

    def config_key(self, field: str | None) -> str | None:
        """The config key that maps record field `field` ("data.answer_field"), if one does."""
        return next((FIELDS[attr][0] for attr, name in self.used().items() if name == field), None)


def check_sample(files: Sequence[str], fields: FieldMap | Mapping[str, str], *, per_file: int = 64,
                 skip_malformed: bool = True, extra: Mapping[str, str] | None = None) -> int:
    """Validates the first `per_file` records of each file against `fields` (a FieldMap, or a schema);
    returns how many were read. Raises DataError as the module docstring says, naming file:line, the
    field, its config key, the expected type and the fields the record does have."""
    fmap = fields if isinstance(fields, FieldMap) else None
    schema = fmap.schema(extra) if fmap is not None else {**fields, **(extra or {})}
    if not schema:
        raise ValueError("check_sample: no fields to check (set data.prompt_field, data.text_field, ...)")
    read = 0
    for path in files:
        source = sources.open_source(path, head=per_file)
        n = min(per_file, len(source))
        errors: list[DataError] = []
        for i in range(n):
            try:
                sources.validate_record(source[i], schema, *source.location(i))
            except DataError as e:
                if not skip_malformed:
                    raise _with_hint(e, fmap, "data.skip_malformed=False") from None
                errors.append(e)
        read += n
        if n and len(errors) == n:
            counts = {}
            for e in errors:
                counts[e.kind] = counts.get(e.kind, 0) + 1
            summary = ", ".join(f"{k}: {c}" for k, c in counts.items())
            raise _with_hint(errors[0], fmap, f"all {n} records read from the start of this file are bad "
                                              f"({summary})") from None
    return read


def _with_hint(error: DataError, fmap: FieldMap | None, note: str) -> DataError:
    """`error` again with the config key of its field and `note` added to the message."""
    key = fmap.config_key(error.field) if fmap is not None else None
    hint = "; ".join(x for x in (f"mapped by {key}" if key else "", note) if x)
    return DataError(error.kind, error.path, error.number, error.unit, error.field, error.expected,
                     error.got, hint)
