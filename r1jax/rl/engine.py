"""The slot engine: continuous batching of the GRPO rollout inside the trainer's own JAX program.

    engine = make_engine(cfg, spec, EngineSpec(slots=S, chunk_steps=K), mesh=mesh, rules=rules)
    out = engine(params, prompts_bp, lengths_b, rng)     # Completions [N = B*G], the static sampler's layout
    engine.stats                                          # slot-steps, decode steps, chunks, preemptions

The static sampler (r1jax.rl.sampler) decodes all N rows until the longest one ends; with R1's long-tailed
lengths most of its slot-steps go to rows that have already finished. Here S decode slots (sized from a
memory budget, `slots_for_budget`, not from N) are kept busy (JetStream's prefill / insert / generate, with
the group's prompt prefilled once):

  1. prefill: the B prompts run once into a prompt cache of P slots (`sampler.prefill_prompts`); their
     next-token logits [B, V] are kept.
  2. chunk (jitted `lax.while_loop`, no host round trip): up to K steps (EngineSpec.chunk_steps; it ends
     early when every row is finished or when the drain below can start), each a decode step of all S slots
     (`models.decode_step` + `sampler.choose`, the static sampler's own step) followed by `insert` when a slot
     finished and rows wait (lax.cond): waiting rows n = b*G + g, in order of n, go into the finished slots;
     prompt b's cache is copied into the slot's first P cache positions and the row's first token is sampled
     from prompt b's logits. The rest of the slot is left as the previous row wrote it: the row writes its
     tokens from its prompt length on, and attention masks every key past the query's slot, so a stale entry
     is overwritten before it can be seen (tests/test_engine.py checks rows against a fresh full forward).
     A slot that finishes is refilled at the next step, not at the end of the chunk.
  3. between chunks the host reads the slots' `finished` flags (S booleans) and whether rows wait; when none
     waits and the live rows fit `drain_size` slots (half; paged, three quarters), it compacts them into that
     many (down to S / EngineSpec.drain_divisor), so the drain at the end of a rollout does not decode empty
     slots.

Paged (EngineSpec.page > 0; vLLM's PagedAttention, in the trainer's JAX program): the slots hold no cache of
their own. The cache is a pool of EngineSpec.pages pages of `page` positions (`models.init_cache(pages=...)`), and
each slot has a page table: position j of its row is in page table[j // page]. A slot of P + T positions holds
the memory of a row that reaches T, which most rows never do; pages let the same memory hold more rows in flight
(S from EngineSpec.slots, not from the memory), so each decode step does more rows' work.
  - insertion takes P / page free pages for the row's prompt and copies the prompt's cache into them;
  - before each decode step, every live row whose next position starts a page takes one (`allocate`);
  - a row that ends gives its pages back at that step (`release`);
  - when the free pages cannot serve every row that needs one, the youngest rows (highest n) are preempted: their
    pages go back and they wait again (`preempt`; vLLM's recompute preemption). The oldest row always goes on,
    since the pool holds at least one whole row, so every rollout ends;
  - parked (finished) slots write into page 0, a scratch page that no row owns;
  - the drain's compaction moves page tables only, never the pool, so it compacts in steps of 3/4.
Decode attention reads each run's cache prefix through the page tables (`models.attention.cache_prefix`): a
gather of whole pages, where a cache of rows is read as a slice (or, with rows sorted into runs, a gather of rows).

Determinism: a row's tokens are drawn with keys derived from (row n, token index) only (`sampler.row_keys`),
so the same seed gives the same rows whatever S, K, the pages or the order in which rows finish (a preempted
row draws the same tokens again), and the same rows as the static sampler. Greedy decoding gives the static
sampler's tokens and log-probs.

Memory: S x (P + T) cache positions plus the prompt cache B x P (the MLA latent or the GQA K/V, whichever the
ModelConfig says), both rows over `cache_batch`; the drain's compaction holds S and S/2 slots at once. Paged:
pages x page positions plus the prompt cache. The static sampler holds N x (P + T). Insertion and compaction
work one layer (and position block) at a time: a whole-cache gather or scatter across the sharded slot axis is
gathered whole on every chip by XLA (docs/sharding.md, the 671B GRPO rollout on v5p-512). The paged engine
gathers pages from the whole pool for every row: meant for one device (the tiny presets, a single host); the
671B preset keeps slots of rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from r1jax import models
from r1jax.rl import sampler as sampler_lib
from r1jax.rl.sampler import Completions, Rows, SamplerSpec
from r1jax.sharding import constrain, use_rules


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """slots: S decode slots (0 = one per row: no row waits); chunk_steps: the most decode steps between two
    host checks (a chunk also ends when every row is finished or the drain can compact); drain_divisor: the drain
    compacts the live rows into halves down to S / drain_divisor slots (1 = never).
    page, pages: a paged cache (module docstring, "Paged") of `pages` pages of `page` positions shared by the
    slots, instead of P + T positions held by every slot (page = 0); `pages_for_budget` sizes it."""

    slots: int = 0
    chunk_steps: int = 256
    drain_divisor: int = 8
    page: int = 0
    pages: int = 0

    def __post_init__(self):
        if self.slots < 0 or self.chunk_steps < 1 or self.drain_divisor < 1 or self.page < 0:
            raise ValueError(f"EngineSpec: need slots >= 0, chunk_steps >= 1, drain_divisor >= 1, page >= 0; "
                             f"got {self}")
        if self.page and (self.slots < 1 or self.pages < 2):
            raise ValueError(f"EngineSpec: a paged engine needs slots >= 1 and pages >= 2; got {self}")


def spec_from_config(rl) -> EngineSpec:
    """The EngineSpec of a config's rl block: rl.slots, rl.chunk_steps, rl.page, rl.pages (configs/r1_zero.py)."""
    return EngineSpec(slots=int(rl.get("slots", 0)), chunk_steps=int(rl.get("chunk_steps", 256)),
                      page=int(rl.get("page", 0)), pages=int(rl.get("pages", 0)))


def cache_bytes_per_position(cfg: models.ModelConfig) -> int:
    """Bytes one cache position of one row takes over all layers (read off `init_cache`'s arrays)."""
    cache = jax.eval_shape(lambda: models.init_cache(cfg, 1, 1))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(cache))


def slots_for_budget(cfg: models.ModelConfig, budget_bytes: float, prompt_len: int, max_new_tokens: int,
                     prompts: int = 0, group_size: int = 1) -> int:
    """The most slots (a multiple of group_size) whose cache, with the prompt cache of `prompts` prompts, fits
    budget_bytes."""
    per = cache_bytes_per_position(cfg)
    slots = int((budget_bytes - prompts * prompt_len * per) // (per * (prompt_len + max_new_tokens)))
    slots -= slots % group_size
    if slots < 1:
        raise ValueError(f"a cache budget of {budget_bytes / 2**20:.1f} MiB holds no decode slot of "
                         f"{prompt_len}+{max_new_tokens} positions ({per} bytes each)")
    return slots


def pages_for_budget(cfg: models.ModelConfig, budget_bytes: float, page: int, prompt_len: int, prompts: int) -> int:
    """The most pages of `page` positions (the parked slots' scratch page included) that fit budget_bytes beside
    the prompt cache of `prompts` prompts."""
    per = cache_bytes_per_position(cfg)
    return int((budget_bytes - prompts * prompt_len * per) // (per * page))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
    """The paged cache's allocator: the free pages are free[:count] (a stack; page 0, the scratch page that
    parked slots write to, is never in it); slot s holds the pages cache["pages"][s, :held[s]]."""

    free: jax.Array  # [pages] int32
    count: jax.Array  # int32 []
    held: jax.Array  # [S] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineState:
    rows: Rows  # [S] slots
    cache: dict  # the decode cache of S slots x (P + T) positions (paged: a pool of pages and S page tables)
    out: Completions  # [N] rows
    pending: jax.Array  # [N] bool: rows waiting for a slot (inserted in order of n)
    steps: jax.Array  # int32 []: decode steps of the last chunk
    pool: Pool | None  # the page allocator (None: not paged)
    preempted: jax.Array  # int32 []: rows preempted so far (paged: their pages went to older rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prompts:
    """What insertion reads: the prefilled prompts and the rows' stop positions."""

    cache: dict  # the prompt cache, B x P positions
    first_logits: jax.Array  # [B, V] next-token logits at each prompt's last token
    limit: jax.Array  # [N] int32: most tokens of each row


def _length_axis(prompt_leaf, slot_leaf) -> int:
    """The cache-position axis of a layer cache leaf: the one (past the layer and batch axes) where the
    prompt cache (P positions) and the slot cache (P + T) differ."""
    return next(i for i in range(2, slot_leaf.ndim) if prompt_leaf.shape[i] != slot_leaf.shape[i])


def insert(state: EngineState, prompts: Prompts, rng, *, spec: SamplerSpec) -> EngineState:
    """Fill the finished slots, in slot order, with the first waiting rows (in order of n): row n gets its prompt's
    cache (prompt n // G) and its first token, sampled from that prompt's logits. Paged: a row also takes the
    pages its prompt fills, and no more rows go in than the free pages hold."""
    s, n = state.rows.row.shape[0], prompts.limit.shape[0]
    free_s = state.rows.finished
    rank_s = jnp.cumsum(free_s) - 1
    row_s = jnp.nonzero(state.pending, size=s, fill_value=n)[0][jnp.clip(rank_s, 0, s - 1)]
    new_s = free_s & (row_s < n)
    cache, pool = dict(state.cache), state.pool
    if pool is not None:
        per_row = _prompt_pages(prompts, cache)
        new_s &= rank_s < pool.count // per_row
    rows_s = jnp.where(new_s, row_s, -1)
    b_s = jnp.maximum(rows_s, 0) // spec.group_size
    if pool is None:
        for key in ("dense", "moe"):
            if key in cache:
                cache[key] = _copy_prompts(cache[key], prompts.cache[key], b_s, new_s)
    else:
        # Row s (the rank_s-th new one) takes the per_row pages below the stack's top in order; other slots' copy
        # goes to the scratch page.
        j = jnp.arange(per_row)
        taken = pool.free[jnp.maximum(pool.count - 1 - (rank_s[:, None] * per_row + j), 0)]  # [S, per_row]
        taken = jnp.where(new_s[:, None], taken, 0)
        for key in ("dense", "moe"):
            if key in cache:
                cache[key] = jax.tree.map(functools.partial(_paste_prompt_pages, b_s=b_s, pages_sq=taken),
                                          cache[key], prompts.cache[key])
        table = jnp.zeros_like(cache["pages"]).at[:, :per_row].set(taken)
        cache["pages"] = jnp.where(new_s[:, None], table, cache["pages"])
        pool = Pool(free=pool.free, count=pool.count - per_row * new_s.sum(dtype=jnp.int32),
                    held=jnp.where(new_s, per_row, pool.held))
    seg = prompts.cache["segment_ids"][b_s]  # [S, P]
    seg = jnp.pad(seg, ((0, 0), (0, cache["segment_ids"].shape[1] - seg.shape[1])))  # the row's own positions only
    cache["segment_ids"] = jnp.where(new_s[:, None], seg, cache["segment_ids"])
    for key in ("length", "next_position", "segment"):
        cache[key] = jnp.where(new_s, prompts.cache[key][b_s], cache[key])
    fresh = sampler_lib.empty_rows(s, spec).replace(row=rows_s, limit=prompts.limit[jnp.maximum(rows_s, 0)])
    rows = jax.tree.map(lambda new, old: jnp.where(new_s.reshape((s,) + (1,) * (old.ndim - 1)), new, old),
                        fresh, state.rows)
    rows, out = sampler_lib.choose(rows, state.out, prompts.first_logits[b_s], rng, spec, active_r=new_s)
    pending = state.pending.at[jnp.where(new_s, rows_s, n)].set(False, mode="drop")
    return dataclasses.replace(state, rows=rows, cache=cache, out=out, pending=pending, pool=pool)


def _page(cache: dict) -> int:
    """Positions per page of a paged decode cache."""
    return cache["segment_ids"].shape[1] // cache["pages"].shape[1]


def _prompt_pages(prompts: Prompts, cache: dict) -> int:
    """Pages a row's prompt fills: the prompt bucket P (a multiple of the page) over the page size."""
    return prompts.cache["segment_ids"].shape[1] // _page(cache)


def _paste_prompt_pages(pool_leaf, prompt_leaf, *, b_s, pages_sq):
    """pool_leaf [L, pages, ..., page, ...] with prompt b_s[s]'s cache (prompt_leaf [L, B, ..., P, ...]) cut
    into the pages pages_sq[s, :] (the scratch page 0 for the slots that take no prompt)."""
    ax = pool_leaf.ndim - 2  # the position axis: P in the prompt cache, a page in the pool
    page, q = pool_leaf.shape[ax], pages_sq.shape[1]
    x = jnp.take(prompt_leaf, b_s, axis=1)  # [L, S, ..., P, ...]
    x = x.reshape(x.shape[:ax] + (q, page) + x.shape[ax + 1:])
    return pool_leaf.at[:, pages_sq].set(jnp.moveaxis(x, ax, 2).astype(pool_leaf.dtype))  # [L, S, q, ..., page, ...]


def _copy_prompts(slot_tree, prompt_tree, b_s, new_s):
    """Slot s of every layer gets prompt b_s[s]'s cache in its first P positions where new_s[s]; the others keep
    theirs. One layer at a time (lax.fori_loop, in place), and a select over the slots, not a scatter into them:
    the slots stay where `cache_batch` puts them and only one layer's gathered prompt rows [S, P, ...] exist at
    once (a scatter of all layers' [L, S, P, ...] rows held 530 GiB per chip at 671B, S = 2048, P = 2048)."""

    def layer(i, tree):
        def put(slot_leaf, prompt_leaf):
            ax = _length_axis(prompt_leaf, slot_leaf)
            start = (i,) + (0,) * (slot_leaf.ndim - 1)
            old = jax.lax.dynamic_slice(slot_leaf, start, (1,) + slot_leaf.shape[1:ax] + (prompt_leaf.shape[ax],)
                                        + slot_leaf.shape[ax + 1:])  # [1, S, ..., P, ...]
            new = jnp.take(jax.lax.dynamic_slice_in_dim(prompt_leaf, i, 1, axis=0), b_s, axis=1)
            new = constrain(new, (None, "cache_batch") + (None,) * (new.ndim - 2))
            keep = new_s.reshape((1, -1) + (1,) * (new.ndim - 2))
            return jax.lax.dynamic_update_slice(slot_leaf, jnp.where(keep, new.astype(old.dtype), old), start)

        return jax.tree.map(put, tree, prompt_tree)

    return jax.lax.fori_loop(0, jax.tree.leaves(slot_tree)[0].shape[0], layer, slot_tree)


def release(state: EngineState, gone_s) -> EngineState:
    """Paged: the pages of slots gone_s [S] go back on the free stack and their page tables to the scratch page."""
    pool, table = state.pool, state.cache["pages"]
    own_sm = gone_s[:, None] & (jnp.arange(table.shape[1]) < pool.held[:, None])  # [S, M]
    at = jnp.where(own_sm, pool.count + jnp.cumsum(own_sm.ravel()).reshape(own_sm.shape) - 1, pool.free.shape[0])
    free = pool.free.at[at.ravel()].set(table.ravel(), mode="drop")
    pool = Pool(free=free, count=pool.count + own_sm.sum(dtype=jnp.int32), held=jnp.where(gone_s, 0, pool.held))
    cache = {**state.cache, "pages": jnp.where(gone_s[:, None], 0, table)}
    return dataclasses.replace(state, cache=cache, pool=pool)


def preempt(state: EngineState, spec: SamplerSpec) -> EngineState:
    """Paged, when the live rows need more new pages than are free: the youngest rows (highest n; vLLM's
    first-come-first-served order) give their pages back and wait again, as few as lets every older row take
    the page it needs. The oldest row always goes on (the pool holds a whole row), so every row ends. A
    preempted row restarts from its prompt; its keys depend on (row, token index) only, so it draws its tokens
    again."""
    s, n = state.rows.row.shape[0], state.pending.shape[0]
    live_s = ~state.rows.finished
    need_s = live_s & (state.cache["length"] >= state.pool.held * _page(state.cache))
    order = jnp.argsort(jnp.where(live_s, state.rows.row, n + jnp.arange(s)))  # oldest live rows first
    held_o = jnp.where(live_s, state.pool.held, 0)[order]
    # keep rows 0..i of that order iff their new pages fit in the free ones plus those of the rows after i
    keep_o = jnp.cumsum(need_s[order]) <= state.pool.count + held_o.sum() - jnp.cumsum(held_o)
    gone_s = live_s & ~jnp.zeros((s,), bool).at[order].set(keep_o)
    state = release(state, gone_s)
    row_s = jnp.where(gone_s, state.rows.row, n)  # n: out of range, dropped
    out = state.out
    out = Completions(tokens=out.tokens.at[row_s].set(spec.pad_id, mode="drop"),
                      logprobs=out.logprobs.at[row_s].set(0.0, mode="drop"),
                      lengths=out.lengths.at[row_s].set(0, mode="drop"),
                      truncated=out.truncated.at[row_s].set(False, mode="drop"))
    rows = state.rows.replace(row=jnp.where(gone_s, -1, state.rows.row))
    cache = {**state.cache, "length": jnp.where(gone_s, 0, state.cache["length"])}
    return dataclasses.replace(state, rows=rows, cache=cache, out=out,
                               pending=state.pending.at[row_s].set(True, mode="drop"),
                               preempted=state.preempted + gone_s.sum(dtype=jnp.int32))


def allocate(state: EngineState, spec: SamplerSpec) -> EngineState:
    """Paged, before a decode step: every live row whose next position starts a page takes one from the free
    stack (preempting the youngest rows first when too few are free)."""
    page = _page(state.cache)

    def needs(st):
        return ~st.rows.finished & (st.cache["length"] >= st.pool.held * page)

    state = jax.lax.cond(needs(state).sum() > state.pool.count, functools.partial(preempt, spec=spec),
                         lambda st: st, state)
    pool, table, need_s = state.pool, state.cache["pages"], needs(state)
    got_s = pool.free[jnp.maximum(pool.count - jnp.cumsum(need_s), 0)]
    s = table.shape[0]
    table = table.at[jnp.where(need_s, jnp.arange(s), s), pool.held].set(got_s, mode="drop")
    pool = Pool(free=pool.free, count=pool.count - need_s.sum(dtype=jnp.int32), held=pool.held + need_s)
    return dataclasses.replace(state, cache={**state.cache, "pages": table}, pool=pool)


def drain_size(slots: int, paged: bool) -> int:
    """The slots the drain compacts `slots` into: half (a cache of rows moves whole rows), or three quarters
    when paged (only page tables move, so smaller steps cost little and decode fewer empty slots)."""
    return slots * 3 // 4 if paged else slots // 2


def chunk(params, state: EngineState, prompts: Prompts, rng, *, cfg: models.ModelConfig, spec: SamplerSpec,
          steps: int, shrink: bool) -> EngineState:
    """Up to `steps` decode steps of every slot (one lax.while_loop), each followed by the insertion of waiting
    rows into the slots that finished (`insert`, skipped by lax.cond when none did). Stops early once every row
    is finished, or (shrink) once no row waits and the live rows fit `drain_size` slots: the host compacts them.
    Paged: each step first gives a page to every row that starts one (`allocate`), and a row that ends gives its
    pages back (`release`)."""
    s = state.rows.row.shape[0]
    paged = state.pool is not None

    def refill(st):
        return jax.lax.cond(jnp.any(st.rows.finished) & jnp.any(st.pending),
                            functools.partial(insert, prompts=prompts, rng=rng, spec=spec), lambda x: x, st)

    def running(carry):
        st, i = carry
        live = ~st.rows.finished
        go = (i < steps) & jnp.any(live)
        return go & ~(~jnp.any(st.pending) & (live.sum() <= drain_size(s, paged))) if shrink else go

    def step(carry):
        st, i = carry
        if paged:
            st = allocate(st, spec)
        logits_sv, cache = models.decode_step(params, st.rows.token, cfg, st.cache)
        rows, out = sampler_lib.choose(st.rows, st.out, logits_sv, rng, spec)
        # A finished slot keeps decoding (its output is dropped) at cache position 0, inside the prompt part that
        # insertion overwrites (paged: in the scratch page): its length does not set how long a cache prefix the
        # batch's decode attention reads (models.attention.blocked_cache_attention: the rows sorted by length, in
        # runs), only the live rows' lengths do.
        cache["length"] = jnp.where(rows.finished, 0, cache["length"])
        st = dataclasses.replace(st, rows=rows, cache=cache, out=out)
        if paged:
            st = release(st, rows.finished & (st.pool.held > 0))
        return refill(st), i + 1

    state, i = jax.lax.while_loop(running, step, (refill(state), jnp.zeros((), jnp.int32)))
    return dataclasses.replace(state, steps=i)


# Cache positions per piece of the drain's compaction (`compact`).
COMPACT_BLOCK = 1024


def _take_slots(x, keep_s):
    """x [L, S, ..., W, X] (a stacked layer cache: slots on axis 1, positions on axis -2) -> [L, S', ..., W, X],
    the slots keep_s [S'], one (layer, block of COMPACT_BLOCK positions) piece at a time. The slots are sharded
    (`cache_batch`), so the gather moves rows between chips and XLA gathers each piece's operand whole: of the
    whole cache at once that was 4.1 TiB per chip at 671B (S = 2048, 2048 + 32768 positions); of one piece it
    is S x COMPACT_BLOCK positions of one layer."""
    layers, width = x.shape[0], x.shape[-2]
    block = min(COMPACT_BLOCK, width)
    blocks = -(-width // block)
    out = constrain(jnp.zeros((layers, keep_s.shape[0]) + x.shape[2:], x.dtype),
                    ("layers", "cache_batch") + (None,) * (x.ndim - 2))

    def piece(j, out):
        start = [j // blocks, 0] + [0] * (x.ndim - 4) + [jnp.minimum(j % blocks * block, width - block), 0]
        got = jnp.take(jax.lax.dynamic_slice(x, start, (1,) + x.shape[1:-2] + (block, x.shape[-1])), keep_s, axis=1)
        return jax.lax.dynamic_update_slice(out, constrain(got, (None, "cache_batch") + (None,) * (x.ndim - 2)),
                                            start)

    return jax.lax.fori_loop(0, layers * blocks, piece, out)


def compact(state: EngineState, keep_s) -> EngineState:
    """The slots keep_s [S'] (live ones first) as a state of S' slots. Paged, the pool stays as it is: only the
    slots' page tables move."""
    paged = state.pool is not None
    cache = {k: (v if paged else jax.tree.map(lambda x: _take_slots(x, keep_s), v)) if k in ("dense", "moe")
             else jnp.take(v, keep_s, axis=0) for k, v in state.cache.items()}
    pool = None if not paged else dataclasses.replace(state.pool, held=jnp.take(state.pool.held, keep_s))
    return dataclasses.replace(state, rows=jax.tree.map(lambda x: jnp.take(x, keep_s, axis=0), state.rows),
                               cache=cache, pool=pool)


def _shard_cache(cache: dict) -> dict:
    """A decode cache's rows over `cache_batch` (the slot cache and the prompt cache alike)."""
    return {k: (jax.tree.map(lambda x: constrain(x, ("layers", "cache_batch") + (None,) * (x.ndim - 2)), v)
                if k in ("dense", "moe") else constrain(v, ("cache_batch",) + (None,) * (v.ndim - 1)))
            for k, v in cache.items()}


class Engine:
    """`engine(params, prompts_bp, prompt_lengths_b, rng, limit_n=None) -> Completions` (module docstring);
    `stats` describes the last call: slot_steps (sum over chunks of slots x decode steps, plus one per row for
    its first token), decode_steps, chunks, peak_slots."""

    def __init__(self, cfg: models.ModelConfig, spec: SamplerSpec, engine: EngineSpec, *, mesh=None, rules=None):
        self.cfg, self.spec, self.engine, self.mesh, self.rules = cfg, spec, engine, mesh, rules
        self.stats: dict = {}
        # The params arrive in their model shardings (as the stage keeps them) and every jitted piece takes its
        # inputs' shardings; the slot arrays are sharded over `act_batch` / `cache_batch` by `constrain`.
        self._prefill = jax.jit(self._prefill_prompts, static_argnames=("cache_len",))
        self._chunk = jax.jit(functools.partial(chunk, cfg=cfg, spec=spec, steps=engine.chunk_steps),
                              static_argnames=("shrink",), donate_argnums=1)
        self._compact = jax.jit(compact)
        self._init = jax.jit(self._empty, static_argnums=(0, 1, 2))

    def _prefill_prompts(self, params, prompts_bp, prompt_lengths_b, cache_len: int):
        cache, first_bv = sampler_lib.prefill_prompts(params, prompts_bp, prompt_lengths_b, self.cfg, cache_len)
        return _shard_cache(cache), first_bv

    def _empty(self, slots: int, n: int, cache_len: int) -> EngineState:
        page, pages = self.engine.page, self.engine.pages
        cache = _shard_cache(models.init_cache(self.cfg, slots, cache_len, pages=pages if page else 0, page=page))
        zero = jnp.zeros((), jnp.int32)
        pool = None if not page else Pool(free=jnp.arange(1, pages + 1, dtype=jnp.int32) % pages,
                                          count=jnp.asarray(pages - 1, jnp.int32), held=jnp.zeros((slots,), jnp.int32))
        return EngineState(rows=sampler_lib.empty_rows(slots, self.spec), cache=cache,
                           out=sampler_lib.empty_completions(n, self.spec), pending=jnp.ones((n,), bool), steps=zero,
                           pool=pool, preempted=zero)

    def __call__(self, params, prompts_bp, prompt_lengths_b, rng, limit_n=None) -> Completions:
        with contextlib.nullcontext() if self.mesh is None else use_rules(self.mesh, self.rules):
            return self._run(params, prompts_bp, prompt_lengths_b, rng, limit_n)

    def _check_pages(self, p: int, t: int):
        page, pages, block = self.engine.page, self.engine.pages, self.cfg.decode_block
        if not page:
            return
        if p % page or t % page or (block and block % page):
            raise ValueError(f"EngineSpec.page={page} must divide the prompt bucket ({p}), max_new_tokens ({t}) "
                             f"and the model's decode_block ({block})")
        if pages - 1 < (p + t) // page:
            raise ValueError(f"EngineSpec.pages={pages} holds no whole row: a row of {p}+{t} positions takes "
                             f"{(p + t) // page} pages of {page}, and page 0 is the scratch page")

    def _run(self, params, prompts_bp, prompt_lengths_b, rng, limit_n):
        spec = self.spec
        b, p = prompts_bp.shape
        n, t = b * spec.group_size, spec.max_new_tokens
        self._check_pages(p, t)
        paged = bool(self.engine.page)
        limit_n = np.full((n,), t, np.int32) if limit_n is None else np.minimum(np.asarray(limit_n, np.int32), t)
        slots = min(self.engine.slots or n, n)
        min_slots = max(1, slots // self.engine.drain_divisor)
        prompt_cache, first_bv = self._prefill(params, prompts_bp, prompt_lengths_b, cache_len=p)
        prompts = Prompts(cache=prompt_cache, first_logits=first_bv, limit=limit_n)
        state = self._init(slots, n, p + t)
        slot_steps, decode_steps, chunks = n, 0, 0  # n: the first token of each row, drawn at its insertion
        while True:
            smaller = drain_size(slots, paged)
            state = self._chunk(params, state, prompts, rng, shrink=smaller >= min_slots)
            # process_allgather: the flags are sharded over the devices of every process (device_get reads
            # only arrays this process holds whole); one process: a plain read
            steps, finished, waiting = multihost_utils.process_allgather(
                (state.steps, state.rows.finished, jnp.any(state.pending)), tiled=True)
            slot_steps += int(steps) * slots
            decode_steps += int(steps)
            chunks += 1
            if waiting:
                continue
            if finished.all():
                break
            if (~finished).sum() <= smaller and smaller >= min_slots:  # the drain: compact the live rows
                keep = np.concatenate([np.flatnonzero(~finished), np.flatnonzero(finished)])[:smaller]
                state = self._compact(state, keep.astype(np.int32))
                slots = smaller
        slot_steps += int(state.preempted)  # a preempted row draws its first token again
        self.stats = {"slot_steps": slot_steps, "decode_steps": decode_steps, "chunks": chunks,
                      "peak_slots": min(self.engine.slots or n, n), "preempted": int(state.preempted)}
        return state.out


@functools.lru_cache(maxsize=16)
def make_engine(cfg: models.ModelConfig, spec: SamplerSpec, engine: EngineSpec, *, mesh=None, rules=None) -> Engine:
    """An Engine (its jitted pieces compile once per prompt bucket, batch size and slot count)."""
    return Engine(cfg, spec, engine, mesh=mesh, rules=rules)
