"""The group sampler: G completions for each of B prompts, decoded inside one jitted `lax.while_loop`.

    spec = SamplerSpec(method=Temperature(1.0), group_size=G, max_new_tokens=T, eos_id=tok.eos_id,
                       pad_id=tok.pad_id, stop_sequences=stops.stop_strings(tok, ("</answer>",)))
    sample = make_sampler(cfg, spec, mesh=mesh, rules=rules)       # jitted, cached per (cfg, spec, mesh)
    prompts_bp, lengths_b = pad_prompts(token_lists, buckets=(128, 256), pad_id=tok.pad_id)
    out = sample(params, prompts_bp, lengths_b, rng)               # Completions, rows [N = B*G]

Row n = b*G + g is sample g of prompt b (the layout `grpo.group_advantages` expects). This is the static batch:
every row is decoded until the longest one ends. The slot engine (r1jax.rl.engine) keeps a fixed number of
slots busy instead and shares this module's per-row step (`choose`), so both draw the same rows.

Algorithm (dimension letters: B prompts, G group size, N = B*G rows, P prompt bucket, T new tokens, V vocab,
S = P + T cache slots):
  1. prefill: the B prompts, right-padded to P (segment 0 = padding), run once into a cache of S slots;
     the logits at each prompt's last real token are the first next-token distribution.
  2. share: every cache row and those logits are repeated G times (`jnp.repeat` on the batch axis), so the
     G samples of a group share one prefill. The cache is the MLA latent (kv_lora_rank + qk_rope_head_dim
     values per token per layer) or the GQA K/V heads, whichever the ModelConfig says.
  3. first token: sampled from the prefill logits (`categorical`: the inverse CDF at one uniform per row).
  4. loop (`lax.while_loop`, no host round trip): decode the last token of every row (`models.decode_step`,
     which writes it at the slot right after that row's previous token, so the prompt's padding slots are
     overwritten and never attended), sample the next one (`choose`), until every row is finished.
  A row is done after it emits any of the EOS ids or completes a stop string (r1jax.rl.stops: matched on the
  text, however it was tokenised; both kept in the completion); after that it carries `pad_id` and log-prob 0.
  A row still running after T tokens (or its own stop position `limit_n`) is truncated. Ids >= spec.vocab_size
  (the tokenizer's; a real checkpoint's embedding has padding rows beyond it) are never drawn.
  The uniform that draws token j of row n comes from fold_in(fold_in(rng, n), j) (`row_keys`): a row's samples
  depend on the seed and its index only, not on the batch or slot it is decoded in.

Log-probs: for a sampled token y the sampler records log softmax(logits / temperature)[y], the
*untruncated* temperature distribution, whatever top-k / top-p filtering chose y. This is what the trainer
recomputes with `models.forward` and the same temperature division (r1jax.rl.trainer), so the importance
ratio at the first update is 1 up to floating-point error. `Greedy` reports them at its `temperature`
(default 1).

Shapes compile once per (P, T): prompts are padded to the smallest of a few prompt-length buckets
(`pad_prompts`), and T is the spec's max_new_tokens. Under a mesh the params keep their model shardings,
rows are sharded over the data-like axes (`act_batch` / `cache_batch` rules) and stay replicated when N does
not divide them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import models
from r1jax.rl import stops as stops_lib
from r1jax.sharding import constrain, use_rules

# ------------------------------------------------------------------------------------- sampling methods

# Tokens TopP sorts first: the nucleus is taken from the TOP_P_PREFILTER most likely tokens when they hold mass
# >= p in every row (the usual case), else from a sort of the whole vocabulary. A full sort per step costs
# 5 ms for 64 rows of a 512-token vocabulary on a CPU core, more than the tiny model's whole decode step.
TOP_P_PREFILTER = 256


def first_argmax(x_nv):
    """jnp.argmax over the last axis (the first index of the maximum) as two plain reductions; XLA:CPU's
    variadic argmax reduce is ~4x slower (0.2 ms for [64, 512], 9 ms for [64, 32000])."""
    max_n1 = jnp.max(x_nv, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x_nv == max_n1, jnp.arange(x_nv.shape[-1]), x_nv.shape[-1]), axis=-1).astype(jnp.int32)


def categorical(keys_n, logits_nv):
    """One draw per row from softmax(logits_nv), -inf = excluded, by inverting the CDF at one uniform per row
    (row n's uniform from its own key keys_n[n], so a row's draw does not depend on which rows it is batched with).

    jax.random.categorical draws V Gumbel variables per row and takes their argmax: 0.9 ms for [64, 512] on
    XLA:CPU (60 ms for [64, 32000]), against 0.1 ms (2 ms) here. Same distribution, different draws per key.
    1. p = exp(logits - max), in blocks of b ~ sqrt(V) tokens (the tail padded with p = 0); u = U(0,1) * sum p.
    2. the block j whose cumulative mass first exceeds u (a cumsum over V/b block sums);
    3. the token in block j whose cumulative mass first exceeds u (a cumsum over b).
    A "first exceeding" index always has p > 0, so an excluded token is never drawn; when rounding puts u past
    the last cumulative sum, the draw is clamped to the last block / token with p > 0."""
    n, v = logits_nv.shape
    b = 1 << (math.isqrt(v) - 1).bit_length()  # block: the power of two >= sqrt(V)
    nb = -(-v // b)
    p_nv = jnp.exp(logits_nv.astype(jnp.float32) - jnp.max(logits_nv, axis=-1, keepdims=True))
    p_njb = jnp.pad(p_nv, ((0, 0), (0, nb * b - v))).reshape(n, nb, b)

    def first_exceeding(cum_nx, u_n1, mass_nx):
        last_n = jnp.max(jnp.where(mass_nx > 0, jnp.arange(cum_nx.shape[1]), 0), axis=-1)
        return jnp.minimum(jnp.sum(cum_nx <= u_n1, axis=-1), last_n)

    mass_nj = p_njb.sum(-1)
    cum_nj = jnp.cumsum(mass_nj, axis=-1)
    u_n1 = jax.vmap(lambda key: jax.random.uniform(key, (1,), jnp.float32))(keys_n) * cum_nj[:, -1:]
    j_n = first_exceeding(cum_nj, u_n1, mass_nj)
    block_nb = jnp.take_along_axis(p_njb, j_n[:, None, None], axis=1)[:, 0]
    before_n1 = jnp.take_along_axis(cum_nj - mass_nj, j_n[:, None], axis=1)  # mass of the blocks before j
    i_n = first_exceeding(before_n1 + jnp.cumsum(block_nb, axis=-1), u_n1, block_nb)
    return (j_n * b + i_n).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """argmax. `temperature` only sets the distribution the returned log-probs are taken from."""

    temperature: float = 1.0

    def __call__(self, logits_nv, keys_n):
        return first_argmax(logits_nv)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / temperature)."""

    temperature: float = 1.0

    def keep(self, scaled_nv):
        return None

    def __call__(self, logits_nv, keys_n):
        scaled_nv = logits_nv.astype(jnp.float32) / self.temperature
        keep_nv = self.keep(scaled_nv)
        if keep_nv is not None:
            scaled_nv = jnp.where(keep_nv, scaled_nv, -jnp.inf)
        return categorical(keys_n, scaled_nv)


@dataclasses.dataclass(frozen=True)
class TopK(Temperature):
    """Sample among the k most likely tokens (ties with the k-th are kept too)."""

    k: int = 50

    def keep(self, scaled_nv):
        kth_n1 = jax.lax.top_k(scaled_nv, self.k)[0][:, -1:]
        return scaled_nv >= kth_n1


@dataclasses.dataclass(frozen=True)
class TopP(Temperature):
    """Nucleus sampling (Holtzman et al. 2020): the smallest set of most likely tokens whose probability
    reaches p, i.e. a token is kept when the mass of the tokens sorted before it is < p (ties in the order
    of the vocabulary). Sorts only the TOP_P_PREFILTER most likely tokens unless some row's nucleus is larger."""

    p: float = 0.95

    def keep(self, scaled_nv):
        probs_nv = jax.nn.softmax(scaled_nv, axis=-1)
        rows_n1 = jnp.arange(scaled_nv.shape[0])[:, None]

        def nucleus(k: int):
            """The keep mask from the k most likely tokens, and whether they hold mass >= p in every row (then
            no token past them is kept: the mass before each of them is >= p)."""
            sorted_nk, order_nk = jax.lax.top_k(probs_nv, k)  # most likely first, ties by index
            before_nk = jnp.cumsum(sorted_nk, axis=-1) - sorted_nk  # mass of the tokens ranked before
            keep_nv = jnp.zeros(scaled_nv.shape, bool).at[rows_n1, order_nk].set(before_nk < self.p)
            return keep_nv, jnp.all(sorted_nk.sum(-1) >= self.p)

        vocab = scaled_nv.shape[-1]
        if vocab <= TOP_P_PREFILTER:
            return nucleus(vocab)[0]
        keep_nv, covered = nucleus(TOP_P_PREFILTER)
        return jax.lax.cond(covered, lambda: keep_nv, lambda: nucleus(vocab)[0])


Method = Greedy | Temperature | TopK | TopP


def method_from_config(kind: str, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Method:
    """A sampling method by name ("greedy" | "temperature" | "top_k" | "top_p"), for configs."""
    methods = {"greedy": lambda: Greedy(temperature), "temperature": lambda: Temperature(temperature),
               "top_k": lambda: TopK(temperature, k=int(top_k)), "top_p": lambda: TopP(temperature, p=float(top_p))}
    if kind not in methods:
        raise ValueError(f"sampling method {kind!r}: expected one of {sorted(methods)}")
    return methods[kind]()


# ---------------------------------------------------------------------------------------- spec and state


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Everything static about one sampler compile (hashable).

    eos_id: one id or a tuple of ids (generation_config.json may name several); any of them ends a row.
    stop_sequences: `stops.stop_strings(tokenizer, strings)` (text, however tokenised), or token-id sequences
    (matched on ids); either way a row ends after the token that completes one (kept in the output).
    vocab_size: ids >= vocab_size are never sampled (None = every id of the model): the tokenizer's size, since
    real checkpoints pad their embedding (Qwen2.5: 151,936 rows for ~151,665 tokens) and a padding id has no text.
    Like top-k / top-p, this filters the choice only; the recorded log-probs stay the model's distribution."""

    method: Method
    group_size: int
    max_new_tokens: int
    eos_id: int | tuple[int, ...]
    pad_id: int = 0
    stop_sequences: stops_lib.Stops | tuple[tuple[int, ...], ...] | None = ()
    vocab_size: int | None = None

    def __post_init__(self):
        if self.group_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"SamplerSpec: need group_size >= 1 and max_new_tokens >= 1, got {self}")
        eos = (self.eos_id,) if isinstance(self.eos_id, (int, np.integer)) else tuple(self.eos_id)
        if not eos:
            raise ValueError("SamplerSpec: eos_id names no id")
        object.__setattr__(self, "eos_id", tuple(int(i) for i in eos))
        stop = self.stop_sequences
        if stop is not None and not isinstance(stop, stops_lib.Stops):
            stop = stops_lib.from_token_sequences(stop) if len(stop) else None
        object.__setattr__(self, "stop_sequences", stop)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """Per-row decode state, R rows: the static batch's N rows, or the slot engine's S slots."""

    row: jax.Array  # [R] int32: the output row n = b*G + g decoded here; -1 = an empty slot
    token: jax.Array  # [R] int32: the last token (the next decode step's input)
    length: jax.Array  # [R] int32: tokens so far, EOS / stop string included
    stopped: jax.Array  # [R] bool: ended by EOS or a stop string
    limit: jax.Array  # [R] int32: most tokens this row may have (max_new_tokens, or a per-row stop position)
    window: jax.Array  # [R, Wb] int32: the row's most recent stop symbols (stops.py; Wb = 0 without stops)

    def replace(self, **kw) -> "Rows":
        return dataclasses.replace(self, **kw)

    @property
    def finished(self):
        return (self.row < 0) | self.stopped | (self.length >= self.limit)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Completions:
    """Sampler output, rows N = B*G grouped by prompt."""

    tokens: jax.Array  # [N, T] int32, pad_id after each row's length
    logprobs: jax.Array  # [N, T] float32 log softmax(logits / temperature)[token], 0 after the length
    lengths: jax.Array  # [N] int32
    truncated: jax.Array  # [N] bool: hit max_new_tokens without EOS or a stop sequence


def empty_completions(n: int, spec: SamplerSpec) -> Completions:
    t = spec.max_new_tokens
    return Completions(tokens=constrain(jnp.full((n, t), spec.pad_id, jnp.int32), ("act_batch", None)),
                       logprobs=constrain(jnp.zeros((n, t), jnp.float32), ("act_batch", None)),
                       lengths=constrain(jnp.zeros((n,), jnp.int32), ("act_batch",)),
                       truncated=constrain(jnp.zeros((n,), bool), ("act_batch",)))


def empty_rows(r: int, spec: SamplerSpec) -> Rows:
    """R empty rows (row = -1: finished, nothing to decode)."""
    width = spec.stop_sequences.window_width if spec.stop_sequences else 0
    zeros = constrain(jnp.zeros((r,), jnp.int32), ("act_batch",))
    return Rows(row=zeros - 1, token=zeros, length=zeros, stopped=zeros > 0, limit=zeros,
                window=constrain(jnp.full((r, width), -1, jnp.int32), ("act_batch", None)))


def row_keys(rng, row_r, step_r):
    """The key of token `step` of output row `row`: it depends on (row, step) only, never on where (which slot,
    which batch) the row is decoded, so every engine draws the same samples from the same seed."""
    return jax.vmap(lambda r, j: jax.random.fold_in(jax.random.fold_in(rng, r), j))(row_r, step_r)


def choose(rows: Rows, out: Completions, logits_rv, rng, spec: SamplerSpec, active_r=None
           ) -> tuple[Rows, Completions]:
    """Sample one token for every unfinished row (among active_r [R], default all) from logits_rv [R, V], write
    it (and its log-prob) into row `rows.row` of `out`, and update lengths / stops. Other rows are left as they
    are."""
    method = spec.method
    n, t = out.tokens.shape
    live_r = ~rows.finished if active_r is None else ~rows.finished & active_r
    allowed_rv = logits_rv
    if spec.vocab_size is not None and spec.vocab_size < logits_rv.shape[-1]:  # the embedding's padding rows
        allowed_rv = jnp.where(jnp.arange(logits_rv.shape[-1]) < spec.vocab_size, logits_rv, -jnp.inf)
    token_r = method(allowed_rv, row_keys(rng, jnp.maximum(rows.row, 0), rows.length))
    logp_rv = jax.nn.log_softmax(logits_rv.astype(jnp.float32) / method.temperature, axis=-1)
    logp_r = jnp.take_along_axis(logp_rv, token_r[:, None], axis=-1)[:, 0]
    token_r = jnp.where(live_r, token_r, spec.pad_id)
    hit_r = jnp.isin(token_r, jnp.asarray(spec.eos_id, jnp.int32))
    window = rows.window
    if spec.stop_sequences is not None:
        window, count_r = stops_lib.push(spec.stop_sequences, window, token_r, live_r, logits_rv.shape[-1])
        hit_r = hit_r | stops_lib.hit(spec.stop_sequences, window, count_r)
    target_r = jnp.where(live_r, rows.row, n)  # n: out of range, dropped
    length_r = rows.length + live_r.astype(jnp.int32)
    stopped_r = rows.stopped | (live_r & hit_r)
    out = Completions(tokens=out.tokens.at[target_r, rows.length].set(token_r, mode="drop"),
                      logprobs=out.logprobs.at[target_r, rows.length].set(logp_r, mode="drop"),
                      lengths=out.lengths.at[target_r].set(length_r, mode="drop"),
                      truncated=out.truncated.at[target_r].set(~stopped_r & (length_r >= t), mode="drop"))
    return rows.replace(token=jnp.where(live_r, token_r, rows.token), length=length_r, stopped=stopped_r,
                        window=window), out


def _repeat_rows(cache, g: int):
    """Repeat every cache row g times: bookkeeping leaves have the batch first, layer caches second."""
    out = {}
    for key, value in cache.items():
        if key in ("dense", "moe"):
            out[key] = jax.tree.map(
                lambda x: constrain(jnp.repeat(x, g, axis=1), ("layers", "cache_batch") + (None,) * (x.ndim - 2)),
                value)
        else:
            out[key] = constrain(jnp.repeat(value, g, axis=0), ("cache_batch",) + (None,) * (value.ndim - 1))
    return out


def prefill_prompts(params, prompts_bp, prompt_lengths_b, cfg: models.ModelConfig, cache_len: int):
    """The B right-padded prompts (segment 0 = padding) run once into a cache of cache_len slots.
    Returns (cache, next-token logits [B, V] at each prompt's last real token)."""
    b, p = prompts_bp.shape
    seg_bp = (jnp.arange(p)[None, :] < prompt_lengths_b[:, None]).astype(jnp.int32)
    cache = models.init_cache(cfg, b, cache_len)
    logits_bpv, cache = models.prefill(params, prompts_bp, cfg, cache, segment_ids=seg_bp)
    first_bv = jnp.take_along_axis(logits_bpv, (prompt_lengths_b - 1)[:, None, None], axis=1)[:, 0]
    return cache, first_bv


def sample(params, prompts_bp, prompt_lengths_b, rng, limit_n=None, *, cfg: models.ModelConfig,
           spec: SamplerSpec) -> Completions:
    """G = spec.group_size completions for each right-padded prompt (pure; `make_sampler` jits it).

    prompts_bp [B, P] int32, right-padded (anything after the length); prompt_lengths_b [B] >= 1.
    limit_n [N] (optional): a per-row stop position (at most max_new_tokens), e.g. a benchmark's forced lengths."""
    b, p = prompts_bp.shape
    g, t = spec.group_size, spec.max_new_tokens
    n = b * g
    cache, first_bv = prefill_prompts(params, prompts_bp, prompt_lengths_b, cfg, p + t)
    first_nv = constrain(jnp.repeat(first_bv, g, axis=0), ("act_batch", "act_vocab"))
    limit_n = jnp.full((n,), t, jnp.int32) if limit_n is None else jnp.minimum(limit_n, t)
    rows = empty_rows(n, spec).replace(row=constrain(jnp.arange(n, dtype=jnp.int32), ("act_batch",)), limit=limit_n)
    rows, out = choose(rows, empty_completions(n, spec), first_nv, rng, spec)

    def running(carry):
        return ~jnp.all(carry[0].finished)

    def sample_step(carry):
        rows, out, cache = carry
        logits_nv, cache = models.decode_step(params, rows.token, cfg, cache)
        rows, out = choose(rows, out, logits_nv, rng, spec)
        return rows, out, cache

    _, out, _ = jax.lax.while_loop(running, sample_step, (rows, out, _repeat_rows(cache, g)))
    return out


@functools.lru_cache(maxsize=32)
def make_sampler(cfg: models.ModelConfig, spec: SamplerSpec, *, mesh=None, rules=None):
    """`sample` jitted for (cfg, spec): `fn(params, prompts_bp, prompt_lengths_b, rng, limit_n=None) -> Completions`.

    With a mesh, params are taken in their model shardings and the N rows are sharded over `act_batch`.
    Compiles once per prompt bucket P (and batch size B)."""
    fn = functools.partial(sample, cfg=cfg, spec=spec)
    if mesh is None:
        jitted = jax.jit(fn)
    else:
        # Prompts arrive replicated (B x P ints); rows are sharded inside by `constrain`, which keeps a dimension
        # replicated when it does not divide the mesh axes, so any B and G work.
        replicated = NamedSharding(mesh, P())
        jitted = jax.jit(fn, in_shardings=(models.param_shardings(cfg, mesh, rules),) + (replicated,) * 4)

    def run(params, prompts_bp, prompt_lengths_b, rng, limit_n=None):
        if limit_n is None:
            limit_n = np.full((prompts_bp.shape[0] * spec.group_size,), spec.max_new_tokens, np.int32)
        with contextlib.nullcontext() if mesh is None else use_rules(mesh, rules):
            return jitted(params, prompts_bp, prompt_lengths_b, rng, limit_n)

    return run


# ------------------------------------------------------------------------------------------ host helpers


def bucket(length: int, buckets: Sequence[int], what: str = "length") -> int:
    """The smallest bucket >= length."""
    for size in sorted(buckets):
        if length <= size:
            return int(size)
    raise ValueError(f"{what} {length} exceeds the largest bucket {max(buckets)}; add a bigger bucket "
                     f"(buckets: {tuple(sorted(buckets))})")


def pad_prompts(token_lists: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int,
                batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prompts [B, P] right-padded with pad_id, lengths [B]) with P the smallest bucket that fits them all.
    batch_size > len(token_lists) appends copies of the last prompt (a fixed B keeps one compile)."""
    if not token_lists or any(len(t) == 0 for t in token_lists):
        raise ValueError("pad_prompts: need at least one prompt, and no empty prompt")
    rows = list(token_lists)
    if batch_size is not None:
        if len(rows) > batch_size:
            raise ValueError(f"pad_prompts: {len(rows)} prompts for batch_size={batch_size}")
        rows += [rows[-1]] * (batch_size - len(rows))
    width = bucket(max(len(t) for t in rows), buckets, "prompt length")
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out, np.asarray([len(r) for r in rows], np.int32)

