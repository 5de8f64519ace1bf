"""The group sampler: G completions for each of B prompts, decoded inside one jitted `lax.while_loop`.

    spec = SamplerSpec(method=Temperature(1.0), group_size=G, max_new_tokens=T, eos_id=tok.eos_id,
                       pad_id=tok.pad_id, stop_sequences=stop_token_sequences(tok, ["</answer>"]))
    sample = make_sampler(cfg, spec, mesh=mesh, rules=rules)       # jitted, cached per (cfg, spec, mesh)
    prompts_bp, lengths_b = pad_prompts(token_lists, buckets=(128, 256), pad_id=tok.pad_id)
    out = sample(params, prompts_bp, lengths_b, rng)               # Completions, rows [N = B*G]

Row n = b*G + g is sample g of prompt b (the layout `grpo.group_advantages` expects).

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
     overwritten and never attended), sample the next one, until every row is done or T tokens are out.
  A row is done after it emits EOS or completes one of the stop sequences (both kept in the completion);
  after that it carries `pad_id` and log-prob 0. A row that is still running after T tokens is truncated.

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

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import models
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


def categorical(rng, logits_nv):
    """One draw per row from softmax(logits_nv), -inf = excluded, by inverting the CDF at one uniform per row.

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
    u_n1 = jax.random.uniform(rng, (n, 1), jnp.float32) * cum_nj[:, -1:]
    j_n = first_exceeding(cum_nj, u_n1, mass_nj)
    block_nb = jnp.take_along_axis(p_njb, j_n[:, None, None], axis=1)[:, 0]
    before_n1 = jnp.take_along_axis(cum_nj - mass_nj, j_n[:, None], axis=1)  # mass of the blocks before j
    i_n = first_exceeding(before_n1 + jnp.cumsum(block_nb, axis=-1), u_n1, block_nb)
    return (j_n * b + i_n).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """argmax. `temperature` only sets the distribution the returned log-probs are taken from."""

    temperature: float = 1.0

    def __call__(self, logits_nv, rng):
        return first_argmax(logits_nv)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / temperature)."""

    temperature: float = 1.0

    def keep(self, scaled_nv):
        return None

    def __call__(self, logits_nv, rng):
        scaled_nv = logits_nv.astype(jnp.float32) / self.temperature
        keep_nv = self.keep(scaled_nv)
        if keep_nv is not None:
            scaled_nv = jnp.where(keep_nv, scaled_nv, -jnp.inf)
        return categorical(rng, scaled_nv)


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
    """Everything static about one sampler compile (hashable)."""

    method: Method
    group_size: int
    max_new_tokens: int
    eos_id: int
    pad_id: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token sequences that end a row (kept in the output)

    def __post_init__(self):
        if self.group_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"SamplerSpec: need group_size >= 1 and max_new_tokens >= 1, got {self}")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("SamplerSpec: empty stop sequence")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """The while_loop carry. `window` holds the completion tokens behind L-1 leading -1 columns (L = the longest
    stop sequence), so the last L tokens of every row are one dynamic slice."""

    step: jax.Array  # int32 []: tokens sampled so far (every row)
    window: jax.Array  # [N, L-1+T] int32
    logprobs: jax.Array  # [N, T] float32
    done: jax.Array  # [N] bool
    lengths: jax.Array  # [N] int32: tokens of each row, EOS / stop sequence included
    cache: Any
    rng: jax.Array

    def replace(self, **kw) -> "SamplerState":
        return dataclasses.replace(self, **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Completions:
    """Sampler output, rows N = B*G grouped by prompt."""

    tokens: jax.Array  # [N, T] int32, pad_id after each row's length
    logprobs: jax.Array  # [N, T] float32 log softmax(logits / temperature)[token], 0 after the length
    lengths: jax.Array  # [N] int32
    truncated: jax.Array  # [N] bool: hit max_new_tokens without EOS or a stop sequence


def _stop_table(spec: SamplerSpec) -> np.ndarray:
    """[n_stop, L] stop sequences right-aligned, -1 = any token (left fill)."""
    width = max([len(s) for s in spec.stop_sequences], default=1)
    table = np.full((len(spec.stop_sequences), width), -1, np.int32)
    for i, seq in enumerate(spec.stop_sequences):
        table[i, width - len(seq):] = seq
    return table


def _choose(state: SamplerState, logits_nv, spec: SamplerSpec) -> SamplerState:
    """Sample one token per running row from logits_nv, record it, update done / lengths."""
    method = spec.method
    rng, key = jax.random.split(state.rng)
    token_n = method(logits_nv, key)
    logp_nv = jax.nn.log_softmax(logits_nv.astype(jnp.float32) / method.temperature, axis=-1)
    logp_n = jnp.take_along_axis(logp_nv, token_n[:, None], axis=-1)[:, 0]
    live_n = ~state.done
    token_n = jnp.where(live_n, token_n, spec.pad_id)
    logp_n = jnp.where(live_n, logp_n, 0.0)

    stops = _stop_table(spec)
    width = stops.shape[1]
    window = jax.lax.dynamic_update_slice(state.window, token_n[:, None], (0, state.step + width - 1))
    hit_n = token_n == spec.eos_id
    if spec.stop_sequences:
        last_nl = jax.lax.dynamic_slice(window, (0, state.step), (window.shape[0], width))  # last L tokens
        stop_sl = jnp.asarray(stops)
        match_ns = jnp.all((stop_sl[None] == -1) | (last_nl[:, None, :] == stop_sl[None]), axis=-1)
        hit_n = hit_n | jnp.any(match_ns, axis=-1)
    return state.replace(
        step=state.step + 1, window=window, rng=rng,
        logprobs=jax.lax.dynamic_update_slice(state.logprobs, logp_n[:, None], (0, state.step)),
        done=state.done | (live_n & hit_n), lengths=state.lengths + live_n.astype(jnp.int32))


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


def sample(params, prompts_bp, prompt_lengths_b, rng, *, cfg: models.ModelConfig, spec: SamplerSpec) -> Completions:
    """G = spec.group_size completions for each right-padded prompt (pure; `make_sampler` jits it).

    prompts_bp [B, P] int32, right-padded (anything after the length); prompt_lengths_b [B] >= 1."""
    b, p = prompts_bp.shape
    g, t = spec.group_size, spec.max_new_tokens
    n = b * g
    seg_bp = (jnp.arange(p)[None, :] < prompt_lengths_b[:, None]).astype(jnp.int32)
    cache = models.init_cache(cfg, b, p + t)
    logits_bpv, cache = models.prefill(params, prompts_bp, cfg, cache, segment_ids=seg_bp)
    last_b = prompt_lengths_b - 1
    first_bv = jnp.take_along_axis(logits_bpv, last_b[:, None, None], axis=1)[:, 0]  # next-token logits
    first_nv = constrain(jnp.repeat(first_bv, g, axis=0), ("act_batch", "act_vocab"))
    width = _stop_table(spec).shape[1]
    state = SamplerState(
        step=jnp.zeros((), jnp.int32),
        window=constrain(jnp.full((n, width - 1 + t), -1, jnp.int32), ("act_batch", None)),
        logprobs=constrain(jnp.zeros((n, t), jnp.float32), ("act_batch", None)),
        done=constrain(jnp.zeros((n,), bool), ("act_batch",)),
        lengths=constrain(jnp.zeros((n,), jnp.int32), ("act_batch",)),
        cache=_repeat_rows(cache, g), rng=rng)
    state = _choose(state, first_nv, spec)

    def running(state: SamplerState):
        return (state.step < t) & ~jnp.all(state.done)

    def sample_step(state: SamplerState) -> SamplerState:
        last_n = jax.lax.dynamic_index_in_dim(state.window, state.step + width - 2, axis=1, keepdims=False)
        logits_nv, cache = models.decode_step(params, last_n, cfg, state.cache)
        return _choose(state.replace(cache=cache), logits_nv, spec)

    state = jax.lax.while_loop(running, sample_step, state)
    tokens_nt = state.window[:, width - 1:]
    tokens_nt = jnp.where(jnp.arange(t)[None, :] < state.lengths[:, None], tokens_nt, spec.pad_id)
    return Completions(tokens=constrain(tokens_nt, ("act_batch", None)), logprobs=state.logprobs,
                       lengths=constrain(state.lengths, ("act_batch",)), truncated=constrain(~state.done, ("act_batch",)))


@functools.lru_cache(maxsize=32)
def make_sampler(cfg: models.ModelConfig, spec: SamplerSpec, *, mesh=None, rules=None):
    """`sample` jitted for (cfg, spec): `fn(params, prompts_bp, prompt_lengths_b, rng) -> Completions`.

    With a mesh, params are taken in their model shardings and the N rows are sharded over `act_batch`.
    Compiles once per prompt bucket P (and batch size B)."""
    fn = functools.partial(sample, cfg=cfg, spec=spec)
    if mesh is None:
        return jax.jit(fn)
    # Prompts arrive replicated (B x P ints); rows are sharded inside by `constrain`, which keeps a dimension
    # replicated when it does not divide the mesh axes, so any B and G work.
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(fn, in_shardings=(models.param_shardings(cfg, mesh, rules), replicated, replicated, replicated))

    def run(params, prompts_bp, prompt_lengths_b, rng):
        with use_rules(mesh, rules):
            return jitted(params, prompts_bp, prompt_lengths_b, rng)

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


def stop_token_sequences(tokenizer, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Stop strings as token sequences. A stop string is matched on tokens, not characters: it stops a row
    when the row emits exactly its encoding (`</answer>` is one token in the tiny world's tokenizer)."""
    seqs = tuple(tuple(int(i) for i in tokenizer.encode(s)) for s in stop_strings)
    empty = [s for s, seq in zip(stop_strings, seqs) if not seq]
    if empty:
        raise ValueError(f"stop strings {empty} encode to no tokens")
    return seqs
