"""Decode attention over cache prefixes (r1jax.models.attention.blocked_cache_attention): a decode step reads the
shortest prefix of whole cfg.decode_block blocks that holds its farthest query, per run of rows sorted by length
(cfg.decode_row_groups). Equal to the whole-cache dot attention (fp32, <= 1e-5 relative) for MLA's latent cache
and GQA's K/V cache on rows of different lengths; never reads the cache past the prefix a query's run needs (a
run of short rows: not as far as the long rows' prefix); a paged cache gives the row cache's logits bit for bit;
and the slot engine with small blocks (rows or pages) gives the static sampler's rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import models as M
from r1jax.models import attention as A
from r1jax.rl import engine as E
from r1jax.rl import sampler as S

PROMPTS = [[5, 17, 99], [9, 300, 12, 4, 77, 31, 8], [250, 6, 31, 90, 2, 7, 7, 7, 7, 7, 7, 3], [44]]  # B = 4
SHORT = [[5, 17, 99], [9, 300, 12, 4], [250, 6], [44]]  # the same shapes, farthest row 4 + STEPS
CACHE = 19  # positions: blocks of 4 -> 5 blocks, the last one shifted back to 15 (19 = 4 x 4 + 3)
STEPS = 6


@functools.lru_cache(maxsize=None)
def _model(name):
    # one layer: the attention under test, no MoE layer to compile (tiny_moe's MLA in a dense block)
    cfg = M.get_preset(name, mtp_depth=0, init_std=0.1, n_layers=1, n_dense_layers=1)
    return cfg, jax.jit(M.init, static_argnums=0)(cfg, jax.random.PRNGKey(0))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _decode(params, tokens_bp, cfg, poison=CACHE):
    """Prefill the padded prompts into a cache of CACHE positions, then STEPS greedy decode steps: the logits
    [STEPS, B, V] of every step. NaN in every cache position from `poison` on (one number, or one per row [B]),
    put in after the prefill."""
    seg = (tokens_bp > 0).astype(jnp.int32)
    b = tokens_bp.shape[0]
    logits, cache = M.prefill(params, tokens_bp, cfg, M.init_cache(cfg, b, CACHE), segment_ids=seg)
    bad_bs = jnp.arange(CACHE)[None, :] >= jnp.broadcast_to(jnp.asarray(poison), (b,))[:, None]  # [B, S]
    for key in ("dense", "moe"):
        if key in cache:
            # [L,B,S,C] (MLA latent) or [L,B,K,S,H] (GQA): put B and S in place
            bad = bad_bs[None, :, None, :, None] if cfg.attention == "gqa" else bad_bs[None, :, :, None]
            cache[key] = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), cache[key])
    last = jnp.sum(seg, axis=1) - 1
    token = jnp.argmax(logits[jnp.arange(tokens_bp.shape[0]), last], -1)
    cache["length"] = last + 1  # decode from the slot after each prompt's last token, as the sampler does

    def step(carry, _):
        token, cache = carry
        logits, cache = M.decode_step(params, token, cfg, cache)
        return (jnp.argmax(logits, -1), cache), logits

    return jax.lax.scan(step, (token, cache), None, length=STEPS)[1]


def _prompts(rows):
    p = max(map(len, PROMPTS))
    return jnp.array([row + [0] * (p - len(row)) for row in rows], jnp.int32)


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_dense"])  # MLA absorbed over the latent; GQA over K/V
def test_blocked_decode_equals_whole_cache_attention_and_reads_no_further(name):
    """Rows of 1 to 12 prompt tokens: the blocked steps equal the whole-cache ones (the farthest row reaches the
    shifted last block). With every row short, NaN in the cache past the blocks they reach changes nothing in
    the blocked steps (never read) and poisons the whole-cache ones (0 x NaN in their value sum)."""
    cfg, params = _model(name)
    blocked_cfg, whole_cfg = cfg.replace(decode_block=4), cfg.replace(decode_block=0)
    whole, blocked = (np.asarray(_decode(params, _prompts(PROMPTS), c)) for c in (whole_cfg, blocked_cfg))
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())

    reach = -(-(max(map(len, SHORT)) + STEPS) // 4) * 4  # the farthest short row writes below `reach`
    clean = _decode(params, _prompts(SHORT), blocked_cfg)
    assert (np.asarray(_decode(params, _prompts(SHORT), blocked_cfg, reach)) == np.asarray(clean)).all()
    assert np.isnan(np.asarray(_decode(params, _prompts(SHORT), whole_cfg, reach))).any()


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_dense"])
def test_each_run_of_rows_reads_only_its_own_prefix(name):
    """16 rows, short (1 to 4 prompt tokens) and long (12) in turn; each short row's cache poisoned (NaN) from the
    end of the prefix the short rows reach. In two runs (rows sorted by length: the 8 short ones, then the 8 long
    ones) the steps equal the clean ones, so the short run read no further than its own prefix; in one run the
    short rows read the long rows' prefix and are poisoned. Both equal the whole-cache attention on the clean
    cache."""
    cfg, params = _model(name)
    short = [SHORT[3], SHORT[1], SHORT[2], SHORT[0]] * 2  # lengths 1, 4, 2, 3
    rows = [r for pair in zip(short, [PROMPTS[2]] * 8) for r in pair]  # short, long, short, long, ...
    is_short = np.array([len(r) < 12 for r in rows])
    reach = -(-(max(map(len, short)) + STEPS) // 4) * 4  # the short run's last query slot is below
    poison = np.where(is_short, reach, CACHE)
    tokens = _prompts(rows)
    assert A.decode_runs(cfg.replace(decode_row_groups=2), len(rows)) == 2 == 16 // A.MIN_RUN_ROWS
    two_runs, one_run = (cfg.replace(decode_block=4, decode_row_groups=g) for g in (2, 1))
    whole = np.asarray(_decode(params, tokens, cfg.replace(decode_block=0)))
    clean = np.asarray(_decode(params, tokens, two_runs))
    np.testing.assert_allclose(clean, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
    assert (np.asarray(_decode(params, tokens, two_runs, poison)) == clean).all()
    poisoned = np.asarray(_decode(params, tokens, one_run, poison))
    assert np.isnan(poisoned[:, is_short]).all() and not np.isnan(poisoned[:, ~is_short]).any()


@functools.partial(jax.jit, static_argnames=("cfg", "paged"))
def _decode_paged(params, tokens_bp, cfg, table, paged: bool):
    """_decode over a cache of 20 positions, in rows (paged False) or in pages of 4 (row b's positions in pages
    table[b], the pool's other pages NaN): the logits [STEPS, B, V]."""
    b, seg = tokens_bp.shape[0], (tokens_bp > 0).astype(jnp.int32)
    cache = M.init_cache(cfg, b, 20, pages=2 * table.size + 1 if paged else 0, page=4)
    if paged:
        cache["pages"] = table
        unused = jnp.ones((2 * table.size + 1,), bool).at[table.ravel()].set(False)
        for key in ("dense", "moe"):
            if key in cache:  # [L, pages, (K,) 4, X]
                cache[key] = jax.tree.map(
                    lambda x: jnp.where(unused.reshape((1, -1) + (1,) * (x.ndim - 2)), jnp.nan, x), cache[key])
    logits, cache = M.prefill(params, tokens_bp, cfg, cache, segment_ids=seg)
    token = jnp.argmax(logits[jnp.arange(b), jnp.sum(seg, axis=1) - 1], -1)

    def step(carry, _):
        token, cache = carry
        logits, cache = M.decode_step(params, token, cfg, cache)
        return (jnp.argmax(logits, -1), cache), logits

    return jax.lax.scan(step, (token, cache), None, length=STEPS)[1]


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_dense"])
def test_paged_cache_gives_the_row_cache_logits(name):
    """16 rows of 1 to 12 prompt tokens prefilled and decoded in a cache of rows and in a paged one (each row's 5
    pages of 4 positions scattered over a pool twice as large; the pages no row owns hold NaN): the same logits
    bit for bit, with decode attention in one run and in two runs of rows sorted by length, so the paged reads
    and writes touch exactly each row's own pages."""
    cfg, params = _model(name)
    rows = [r for pair in zip([SHORT[3], SHORT[1], SHORT[2], SHORT[0]] * 2, [PROMPTS[2]] * 8) for r in pair]
    table = jnp.asarray(np.random.default_rng(0).permutation(np.arange(1, 161))[:80].reshape(16, 5), jnp.int32)
    for groups in (1, 2):
        c = cfg.replace(decode_block=4, decode_row_groups=groups)
        ref = np.asarray(_decode_paged(params, _prompts(rows), c, table, False))
        assert not np.isnan(ref).any()
        assert (np.asarray(_decode_paged(params, _prompts(rows), c, table, True)) == ref).all(), groups


def test_decode_widths():
    """Multiples of the block up to the cache, the last one the whole cache; at most MAX_DECODE_WIDTHS."""
    assert A.decode_widths(19, 4) == (4, 8, 12, 16, 19)
    widths = A.decode_widths(34816, 1024)  # the 671B preset: 2048 + 32768 positions, 34 blocks
    assert len(widths) <= A.MAX_DECODE_WIDTHS and widths[-1] == 34816 and widths[0] == 3072
    assert all(w % 1024 == 0 for w in widths[:-1]) and list(widths) == sorted(set(widths))


@pytest.mark.parametrize("slots,pages", [(5, 0), (16, 0), (16, 30)])
def test_engine_with_blocked_decode_gives_the_static_rows(slots, pages):
    """Blocks of 4 positions over caches of 8 + 12: the engine (16 rows of forced lengths, no drain: finished
    slots parked at position 0 beside live ones) gives the greedy rows of the static sampler that reads the whole
    cache. 5 slots: slots reused, one run; 16 slots: two runs of 8 rows sorted by length, the parked slots first;
    paged: 16 slots over 30 pages of 4 (rows preempted and drawn again)."""
    cfg, params = _model("tiny_moe")
    spec = S.SamplerSpec(S.Greedy(), group_size=4, max_new_tokens=12, eos_id=10_000)
    prompts_bp, lengths_b = S.pad_prompts([p[:8] for p in PROMPTS], (8,), pad_id=0)
    limit_n = np.array([12, 3, 7, 1, 5, 12, 2, 9, 4, 11, 6, 8, 10, 2, 12, 5], np.int32)
    engine_cfg = cfg.replace(decode_block=4, decode_row_groups=2)
    assert A.decode_runs(engine_cfg, slots) == (2 if slots == 16 else 1)
    static = S.make_sampler(cfg.replace(decode_block=0), spec)
    engine = E.make_engine(engine_cfg, spec, E.EngineSpec(slots=slots, chunk_steps=4, drain_divisor=1,
                                                          page=4 if pages else 0, pages=pages))
    ref, out = (jax.tree.map(np.asarray, fn(params, prompts_bp, lengths_b, jax.random.PRNGKey(0), limit_n))
                for fn in (static, engine))
    assert (out.tokens == ref.tokens).all() and (out.lengths == limit_n).all()
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert (engine.stats["preempted"] > 0) == (pages > 0)
