"""Stop strings on text, checked inside the jitted decode loop.

A row stops when a stop string ends inside the text of the token it just emitted, however the text was cut
into tokens: `</answer>` as one token, as `</` `answer` `>`, after a space (` </` `answer>`), or followed by a
newline in the same token (`>\\n`). The check runs on device with no host round trip:

  - `Stops.table` [V, W] int32: the last W bytes (UTF-8) of every token's text, right-aligned, -1 on the left
    (`Stops.lengths` [V]: how many of them are real). Built once per (tokenizer, strings) from the Tokenizer
    protocol's `decode`: a token's text is decode([anchor, v]) minus decode([anchor]), so SentencePiece's
    word-initial space (dropped when a piece is decoded alone) is kept. Control tokens decode to nothing.
  - each row carries a window of its M - 1 + W most recent completion bytes (M = the longest stop string,
    -1 before the completion's first byte); a step appends the token's bytes (`push`) and asks, for each
    stop string and each end position inside the new token's bytes, whether the window matches (`hit`).

Token-id stop sequences (`from_token_sequences`) are the same machinery over the identity table (one symbol
per token: its id), so a caller that names token sequences is served by the same code.

Limits, stated: a token longer than W bytes keeps its last W bytes (a stop string ending earlier inside it is
not seen; W = M + TOKEN_SLACK covers a stop string followed by TOKEN_SLACK bytes in one token); a token that
is a fragment of a multi-byte character decodes to U+FFFD, so stop strings are exact for text whose tokens are
whole characters (every ASCII stop string, in every tokenizer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

TOKEN_SLACK = 16  # bytes a token may carry after the end of a stop string and still be matched


@dataclasses.dataclass(frozen=True)
class Stops:
    """Stop patterns over per-token symbols (hashable: part of the sampler's static spec).

    patterns: each stop string's symbols (bytes for text, one id for token sequences).
    token_symbols: per token id, its symbols (the last W of them); None = the identity table (symbol = id)."""

    patterns: tuple[tuple[int, ...], ...]
    token_symbols: tuple[bytes, ...] | None = None

    def __post_init__(self):
        if not self.patterns or any(len(p) == 0 for p in self.patterns):
            raise ValueError(f"Stops: need at least one non-empty stop pattern, got {self.patterns}")

    @property
    def pattern_width(self) -> int:  # M
        return max(len(p) for p in self.patterns)

    @property
    def token_width(self) -> int:  # W
        if self.token_symbols is None:
            return 1
        return max(1, min(max(len(s) for s in self.token_symbols), self.pattern_width + TOKEN_SLACK))

    @property
    def window_width(self) -> int:
        return self.pattern_width - 1 + self.token_width

    def pattern_table(self) -> np.ndarray:
        """[n_stop, M] right-aligned, -1 = any symbol (left fill)."""
        table = np.full((len(self.patterns), self.pattern_width), -1, np.int32)
        for i, p in enumerate(self.patterns):
            table[i, self.pattern_width - len(p):] = p
        return table

    def token_table(self, vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """([V, W] symbols right-aligned with -1 fill, [V] counts) for a vocabulary of `vocab` ids (ids past
        the tokenizer's, e.g. a padded embedding, have no symbols)."""
        w = self.token_width
        if self.token_symbols is None:
            return np.arange(vocab, dtype=np.int32)[:, None], np.ones((vocab,), np.int32)
        table = np.full((vocab, w), -1, np.int32)
        counts = np.zeros((vocab,), np.int32)
        for v, sym in enumerate(self.token_symbols[:vocab]):
            sym = sym[-w:]
            if sym:
                table[v, w - len(sym):] = np.frombuffer(sym, np.uint8)
                counts[v] = len(sym)
        return table, counts


def from_token_sequences(sequences: Sequence[Sequence[int]]) -> Stops:
    """Stops for exact token-id sequences (matched on ids, not text)."""
    return Stops(patterns=tuple(tuple(int(i) for i in s) for s in sequences))


def token_texts(tokenizer) -> list[str]:
    """Every token's text as it reads inside a sequence (not at its start), from `decode` alone."""
    anchor = tokenizer.encode("a")[-1:]
    base = tokenizer.decode(anchor)
    out = []
    for v in range(tokenizer.vocab_size):
        text = tokenizer.decode(anchor + [v])
        out.append(text[len(base):] if text.startswith(base) else tokenizer.decode([v]))
    return out


@functools.lru_cache(maxsize=16)
def stop_strings(tokenizer, strings: tuple[str, ...]) -> Stops | None:
    """Text stops for `strings` (None when there are none): the byte table of `tokenizer`, built once."""
    strings = tuple(strings)
    if not strings:
        return None
    if any(not s for s in strings):
        raise ValueError(f"stop strings {list(strings)}: an empty stop string would stop every row at once")
    return Stops(patterns=tuple(tuple(s.encode("utf-8")) for s in strings),
                 token_symbols=tuple(t.encode("utf-8") for t in token_texts(tokenizer)))


# ------------------------------------------------------------------------------------------- on device


def push(stops: Stops, window_rw, token_r, live_r, vocab: int):
    """Append the symbols of token_r [R] to window_rw [R, M-1+W] for live rows. Returns (window, counts [R]):
    the new token's symbol counts (0 for rows that are not live)."""
    table, counts = stops.token_table(vocab)
    w = table.shape[1]
    sym_rw = jnp.asarray(table)[token_r]  # [R, W]
    count_r = jnp.where(live_r, jnp.asarray(counts)[token_r], 0)
    # new window = the last Wb of (window ++ the token's c symbols): position i reads i + c of that sequence,
    # which is the old window below Wb and the token's right-aligned symbols (past their W - c fill) above it
    wb = window_rw.shape[1]
    joined = jnp.concatenate([window_rw, sym_rw], axis=1)  # [R, Wb + W]
    src = jnp.arange(wb)[None, :] + count_r[:, None]
    idx = jnp.where(src < wb, src, src + w - count_r[:, None])
    return jnp.take_along_axis(joined, idx, axis=1), count_r


def hit(stops: Stops, window_rw, count_r):
    """[R] bool: some stop pattern ends at one of the last count_r symbols of the window."""
    pat_sm = jnp.asarray(stops.pattern_table())
    m, w = stops.pattern_width, stops.token_width
    wb = window_rw.shape[1]
    # ends e = 0..W-1 from the right: the pattern occupies window[wb - e - m : wb - e]
    idx_em = np.arange(m)[None, :] + (wb - m - np.arange(w))[:, None]  # [W, M], static
    seg_rem = window_rw[:, idx_em]  # [R, W, M]
    match_rse = jnp.all((pat_sm[None, :, None, :] == -1) | (seg_rem[:, None] == pat_sm[None, :, None, :]), axis=-1)
    ends_re = jnp.arange(w)[None, :] < count_r[:, None]
    return jnp.any(match_rse & ends_re[:, None, :], axis=(1, 2))
