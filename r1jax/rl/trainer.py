"""The GRPO train step: the trainer's batch layout, log-probs recomputed by `models.forward`, and the jitted
μ × mini-batch update. The stage (r1jax/stages/grpo.py) samples, scores and calls these.

Batch layout (host, numpy; N rows = B prompts x G samples, P prompt bucket, T completion bucket):

    tokens      [N, P+T]   prompt right-aligned in columns [P-len_p, P), completion in [P, P+len_c)
    positions   [N, P+T]   0..len_p-1 over the prompt, len_p..len_p+len_c-1 over the completion
    segment_ids [N, P+T]   1 on real tokens, 0 on padding (left of the prompt, right of the completion)
    completion  [N, T]     the sampled tokens (pad after len_c)
    mask        [N, T]     1 on the completion tokens that are trained (all of them, or none for a
                           truncated completion when truncated completions are masked)

With the prompt right-aligned, the logits predicting completion token j sit at column P-1+j for every row,
so the completion's log-probs are one slice of the forward's logits: log softmax(logits / temperature) at
the sampled token, the sampler's formula, computed by the training forward (the full MLA path, where the
sampler used the absorbed path over the latent cache; they agree to fp32 rounding).

Packed layout (`pack_batch`, rl.pack): at long-tailed lengths most of [N, P+T] is padding (mean completion far
below the bucket T), so the N rows (prompt + completion each, never split) are packed first-fit decreasing into
R sequences of L = P+T columns, K rows at most per sequence:

    tokens, positions, segment_ids  [R, L]   row k of a sequence has segment id k+1, positions 0.. restart
                                             per row, 0 = padding (the attention keeps segments apart)
    start       [R, K]     the column whose logits predict the row's first completion token (its last prompt
                           token), -1 for an empty slot
    mask        [R, K, T]  the unpacked mask of the row in that slot (0 for an empty slot)
    slots       [R, K]     (host only, `Layout`) the row n in each slot, -1 = empty

Every per-row array (advantages [R, K], old / ref / sampler log-probs [R, K, T]) is laid out the same way
(`Layout.rows`, and `Layout.unrows` back to [N, ...]). The forward runs on [R, L]; each column's next-token
log-prob (the output head runs on all R·L columns, prompts included) is gathered back within its sequence
(take_along_axis on the unsharded column axis) to [R, K, T] and the loss sees [R·K, T] rows, empty slots
masked: grpo.policy_loss is unchanged, except that Dr. GRPO's N · max_len counts real rows only (`rows`), so
every aggregate equals the unpacked one (truncated rows masked by rl.mask_truncated count as they do
unpacked). R is rounded up to a multiple of data shards x mini_batches x micro_batches and of the score
chunk (`row_multiple`), and to a few sizes per octave (`pack_rows_bucket`), K to a power of two, so a run
compiles a few shapes. The MoE sequence-wise balance loss is computed per packed sequence (as SFT packing does).

One rollout's update (`make_update`): the N rows (packed: the R sequences, each with all its rows) are split
at random into `mini_batches` mini-batches, μ times over (a fresh split per pass), and each mini-batch is one
optimizer update of the GRPO loss (`grpo.policy_loss`; DeepSeekMath eq. 3 with the k3 KL) plus the MoE balance
loss. Packed mini-batches therefore hold different numbers of rows (whole sequences are drawn, not rows), each
aggregated over the real rows it holds; with one mini-batch the update is exactly the unpacked one. π_old is
the policy before the first update, recomputed by the training forward with the same params (not the sampler's
numbers): by `make_scorer` when there are several updates, inside the single update otherwise. π_ref is a
frozen copy of the params (`ref_logp`, same scorer; `copy_params` can keep it in bf16, the dtype the forward
computes in anyway). All μ × mini_batches updates run in one jitted `lax.scan`.

Memory at long completions: each mini-batch's gradient can be accumulated over `micro_batches` parts (a scan,
the GRPO aggregate re-weighted so the sum equals the mini-batch's gradient exactly, `grpo.aggregate_normaliser`),
and the scorer can run over chunks of `chunk_rows` rows (lax.map), so neither holds the fp32 logits [N, T, V]
of more rows than one part. Parts are strided (row i in part i mod parts), so rows sharded over devices in
contiguous blocks stay where they are. Packed, all of this splits sequences: a mini-batch, micro-batch or score
chunk is a set of whole packed sequences (chunk_rows counts sequences), and each aggregate is over the real
rows it holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import models
from r1jax.rl import grpo
from r1jax.models.transformer import FP32_LEAVES
from r1jax.rl.sampler import bucket
from r1jax.sharding import constrain, logical_to_spec, use_rules
from r1jax.train import optimizer as opt_lib
from r1jax.train import state as state_lib
from r1jax.train.state import TrainState

BATCH_KEYS = ("tokens", "positions", "segment_ids", "completion", "mask")
PACKED_KEYS = ("tokens", "positions", "segment_ids", "start", "mask")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The GRPO loss and update schedule (static under jit)."""

    temperature: float = 1.0  # the sampling temperature: logits are divided by it before log_softmax
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # k3 KL weight; 0 = no reference model
    agg: str = "seq-mean-token-mean"
    max_len: int | None = None  # normaliser of seq-mean-token-sum-norm (the max completion length)
    mu: int = 1  # passes over each rollout
    mini_batches: int = 1  # optimizer updates per pass
    micro_batches: int = 1  # gradient accumulation steps inside each mini-batch (same update, less memory)
    ratio_level: str = "token"  # "token" (GRPO) or "sequence" (GSPO), grpo.policy_loss
    tis_cap: float = 0.0  # truncated importance sampling cap for the sampler's drift; 0 = off
    is_mask_band: tuple[float, float] | None = None  # drop rows whose sampler ratio leaves [lo, hi]; None = off

    def __post_init__(self):
        if self.agg not in grpo.AGG_MODES:
            raise ValueError(f"rl.agg={self.agg!r}: expected one of {grpo.AGG_MODES}")
        if self.ratio_level not in grpo.RATIO_LEVELS:
            raise ValueError(f"rl.ratio_level={self.ratio_level!r}: expected one of {grpo.RATIO_LEVELS}")
        if self.tis_cap < 0 or (self.is_mask_band is not None and not 0 <= self.is_mask_band[0] <= 1
                                <= self.is_mask_band[1]):
            raise ValueError(f"rl.tis_cap={self.tis_cap} must be >= 0 (0 = off) and rl.is_mask_band="
                             f"{self.is_mask_band} must be (lo, hi) with lo <= 1 <= hi")
        if self.mu < 1 or self.mini_batches < 1 or self.micro_batches < 1:
            raise ValueError(f"rl.mu={self.mu}, rl.mini_batches={self.mini_batches} and "
                             f"rl.micro_batches={self.micro_batches} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")

    @property
    def updates_per_rollout(self) -> int:
        return self.mu * self.mini_batches


# ------------------------------------------------------------------------------------------ batch layout


def build_batch(prompts: Sequence[Sequence[int]], completions_nt: np.ndarray, lengths_n: np.ndarray, *,
                prompt_buckets: Sequence[int], completion_buckets: Sequence[int], pad_id: int,
                train_mask_n: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The trainer batch (module docstring) for N rows: prompts[n] (token list), completions_nt[n, :lengths_n[n]].
    train_mask_n [N] bool: rows whose completion is trained (default all)."""
    n = len(prompts)
    lengths_n = np.asarray(lengths_n, np.int32)
    if completions_nt.shape[0] != n or lengths_n.shape != (n,):
        raise ValueError(f"build_batch: {n} prompts, completions {completions_nt.shape}, lengths {lengths_n.shape}")
    p = bucket(max(len(x) for x in prompts), prompt_buckets, "prompt length")
    t = bucket(max(int(lengths_n.max()), 1), completion_buckets, "completion length")
    tokens = np.full((n, p + t), pad_id, np.int32)
    positions = np.zeros((n, p + t), np.int32)
    segment_ids = np.zeros((n, p + t), np.int32)
    completion = np.full((n, t), pad_id, np.int32)
    for i, prompt in enumerate(prompts):
        lp, lc = len(prompt), int(lengths_n[i])
        tokens[i, p - lp:p] = prompt
        tokens[i, p:p + lc] = completions_nt[i, :lc]
        completion[i, :lc] = completions_nt[i, :lc]
        positions[i, p - lp:p + lc] = np.arange(lp + lc)
        segment_ids[i, p - lp:p + lc] = 1
    mask = (np.arange(t)[None, :] < lengths_n[:, None]).astype(np.float32)
    if train_mask_n is not None:
        mask *= np.asarray(train_mask_n, np.float32)[:, None]
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "completion": completion,
            "mask": mask}


def pad_columns(x_nt: np.ndarray, width: int, value=0) -> np.ndarray:
    """x_nt cut or right-padded to `width` columns (sampler outputs -> the trainer's completion bucket)."""
    if x_nt.shape[1] >= width:
        return x_nt[:, :width]
    return np.concatenate([x_nt, np.full((x_nt.shape[0], width - x_nt.shape[1]), value, x_nt.dtype)], axis=1)


def pack_rows_bucket(r: int, multiple: int) -> int:
    """The packed row count for r sequences: up to a multiple of `multiple`, then (past 8 multiples) up to one
    of 8 sizes per octave (m · 2^e multiples, m = 8..15: at most 1/8 of the rows padding), so that a run's
    rollouts compile a few shapes, not one per rollout."""
    units = -(-r // multiple)
    if units > 8:
        scale = 1 << (units.bit_length() - 4)  # units = m · scale with 8 <= m < 16
        units = -(-units // scale) * scale
    return units * multiple


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the N rows sit in the trainer batch: slots [R, K] holds row n (or -1, empty) for a packed batch;
    slots None = the unpacked [N, ...] layout (rows and unrows are then the identity)."""

    n: int
    slots: np.ndarray | None = None

    def rows(self, x_n: np.ndarray) -> np.ndarray:
        """Per-row host array [N, ...] -> the batch's layout ([R, K, ...], 0 in empty slots)."""
        if self.slots is None:
            return x_n
        x = np.asarray(x_n)[np.maximum(self.slots, 0)]
        x[self.slots < 0] = 0
        return x

    def unrows(self, x) -> np.ndarray:
        """The inverse of rows: [R, K, ...] (host or device) -> [N, ...]."""
        x = np.asarray(jax.device_get(x))
        if self.slots is None:
            return x
        out = np.zeros((self.n,) + x.shape[2:], x.dtype)
        real = self.slots >= 0
        out[self.slots[real]] = x[real]
        return out


def pack_batch(batch: dict[str, np.ndarray], multiple: int = 1) -> tuple[dict[str, np.ndarray], Layout]:
    """build_batch's [N, P+T] batch packed into R sequences of P+T columns (module docstring, first-fit
    decreasing; rows never split). multiple: R is a multiple of it (data shards x mini- x micro-batches)."""
    seg = batch["segment_ids"]
    n, width = seg.shape
    p = width - batch["mask"].shape[1]
    first = np.argmax(seg > 0, axis=1)  # [N] the prompt's first column (right-aligned prompts)
    length = (seg > 0).sum(axis=1)  # [N] prompt + completion tokens
    packs: list[list[int]] = []
    free = np.zeros(0, np.int64)  # [packs] columns left
    for i in np.argsort(-length, kind="stable"):
        fits = np.flatnonzero(free >= length[i])
        if fits.size:
            j = int(fits[0])
        else:
            j, free = len(packs), np.append(free, width)
            packs.append([])
        packs[j].append(int(i))
        free[j] -= length[i]
    r = pack_rows_bucket(len(packs), multiple)
    k = 1 << (max(len(x) for x in packs) - 1).bit_length()
    out = {key: np.zeros((r, width), np.int32) for key in ("tokens", "positions", "segment_ids")}
    start = np.full((r, k), -1, np.int32)
    slots = np.full((r, k), -1, np.int32)
    for j, rows in enumerate(packs):
        col = 0
        for s, i in enumerate(rows):
            a, size = first[i], length[i]
            for key in ("tokens", "positions"):
                out[key][j, col:col + size] = batch[key][i, a:a + size]
            out["segment_ids"][j, col:col + size] = s + 1
            start[j, s] = col + (p - a) - 1
            slots[j, s] = i
            col += size
    layout = Layout(n, slots)
    return {**out, "start": start, "mask": layout.rows(batch["mask"])}, layout


def trainer_batch(batch: dict[str, np.ndarray], pack: bool, multiple: int = 1):
    """(batch, Layout): build_batch's batch as it is (pack False) or packed (pack_batch)."""
    return pack_batch(batch, multiple) if pack else (batch, Layout(batch["mask"].shape[0]))


def row_multiple(mesh, rules, loss: LossSpec, chunk_rows: int = 0) -> int:
    """What a packed R must be a multiple of: the data shards of the rows x mini_batches x micro_batches,
    and the scorer's chunk_rows."""
    axes = logical_to_spec(("act_batch",), rules, mesh)[0] or ()
    shards = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    return math.lcm(shards * loss.mini_batches * loss.micro_batches, max(chunk_rows, 1))


# ---------------------------------------------------------------------------------------------- log-probs


def completion_logprobs(params, batch, cfg: models.ModelConfig, temperature: float, *, with_entropy: bool = False):
    """(logp [N,T], aux): log softmax(logits / temperature) at the completion tokens (models.token_logprobs).
    aux: the forward's aux (aux_loss, expert_load) plus `entropy` [N,T] of the temperature distribution
    when with_entropy. A packed batch (a `start` key) gives [R,K,T] for both (module docstring)."""
    h, aux = models.hidden_states(params, batch["tokens"], cfg, positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])
    if "start" in batch:  # packed: every column's next-token log-prob, then each row's completion columns
        r, width = batch["tokens"].shape
        k, t = batch["mask"].shape[1:]
        targets_rl = jnp.pad(batch["tokens"][:, 1:], ((0, 0), (0, 1)))
        outs = models.token_logprobs(params, h, targets_rl, cfg, temperature=temperature, with_entropy=with_entropy)
        cols = jnp.clip(batch["start"][:, :, None] + jnp.arange(t), 0, width - 1).reshape(r, k * t)
        logp_nt, *entropy = (jnp.take_along_axis(x, cols, axis=1).reshape(r, k, t) for x in outs)
    else:
        t = batch["completion"].shape[1]
        p = batch["tokens"].shape[1] - t
        logp_nt, *entropy = models.token_logprobs(params, h[:, p - 1:p - 1 + t], batch["completion"], cfg,
                                                  temperature=temperature, with_entropy=with_entropy)
    out = {k: v for k, v in aux.items() if k in ("aux_loss", "expert_load")}
    if with_entropy:
        out["entropy"] = entropy[0]
    return logp_nt, out


def split_rows(tree, parts: int, what: str):
    """Every [N, ...] leaf -> [parts, N / parts, ...], row i in part i mod parts (module docstring)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    if n % parts:
        raise ValueError(f"{n} rows are not divisible into {what}={parts}")

    def split(x):
        x = jnp.moveaxis(x.reshape(n // parts, parts, *x.shape[1:]), 1, 0)
        return constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, tree)


def merge_rows(x):
    """The inverse of split_rows: [parts, N / parts, ...] -> [N, ...] in the original row order."""
    return jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:])


def _rows(mesh, rules, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1), rules, mesh))


def batch_shardings(mesh, rules, pack: bool = False) -> dict[str, NamedSharding]:
    if pack:
        return {k: _rows(mesh, rules, 3 if k == "mask" else 2) for k in PACKED_KEYS}
    return {k: _rows(mesh, rules, 2) for k in BATCH_KEYS}


def flat_rows(x):
    """A packed per-row array [R, K, ...] -> [R·K, ...], the loss's rows (an unpacked one is passed as is)."""
    return x.reshape(-1, *x.shape[2:])


@functools.lru_cache(maxsize=16)
def make_scorer(cfg: models.ModelConfig, temperature: float, *, mesh, rules, chunk_rows: int = 0,
                pack: bool = False):
    """Jitted `score(params, batch) -> (logp [N,T], entropy)`: the completion log-probs under params and the
    mean entropy of the temperature distribution over the masked tokens (r1jax.rl.grpo.token_entropy).
    chunk_rows > 0: one forward per chunk of that many rows (lax.map; N must be a multiple), 0 = all N at once.
    pack: the batch is packed (pack_batch); logp is then [R,K,T] and chunk_rows counts packed sequences."""

    def score_rows(params, rows):
        logp_nt, aux = completion_logprobs(params, rows, cfg, temperature, with_entropy=True)
        return logp_nt, jnp.sum(aux["entropy"] * rows["mask"])

    def score(params, batch):
        n = batch["mask"].shape[0]
        if 0 < chunk_rows < n:
            if n % chunk_rows:
                raise ValueError(f"{n} rows are not divisible into chunks of {chunk_rows} (rl.score_chunk_rows)")
            logp_cnt, entropy_c = jax.lax.map(functools.partial(score_rows, params),
                                              split_rows(batch, n // chunk_rows, "N / rl.score_chunk_rows"))
            logp_nt, entropy_sum = merge_rows(logp_cnt), jnp.sum(entropy_c)
        else:
            logp_nt, entropy_sum = score_rows(params, batch)
        return logp_nt, entropy_sum / jnp.maximum(jnp.sum(batch["mask"]), 1.0)

    jitted = jax.jit(score, in_shardings=(models.param_shardings(cfg, mesh, rules),
                                          batch_shardings(mesh, rules, pack)),
                     out_shardings=(_rows(mesh, rules, 3 if pack else 2), NamedSharding(mesh, P())))

    def run(params, batch):
        with use_rules(mesh, rules):
            return jitted(params, batch)

    return run


# ----------------------------------------------------------------------------------------------- update


def optimizer_key(opt_block) -> tuple:
    """A hashable copy of config.optimizer (the update step is cached per optimizer settings)."""
    return tuple(sorted(opt_block.to_dict().items())) if hasattr(opt_block, "to_dict") else tuple(sorted(opt_block))


def make_optimizer(cfg: models.ModelConfig, opt_key: tuple, total_steps: int):
    """(tx, schedule) from r1jax.train.optimizer, for config.optimizer given as optimizer_key(...)."""
    return opt_lib.make_optimizer(types.SimpleNamespace(**dict(opt_key)), cfg, total_steps)


@functools.lru_cache(maxsize=16)
def make_update(cfg: models.ModelConfig, opt_key: tuple, total_steps: int, loss: LossSpec, *, mesh, rules,
                pack: bool = False):
    """Jitted `update(state, batch, old_logp, ref_logp, advantages, key, sampler_logp=None) -> (state, metrics,
    logp_before)`: μ passes of `mini_batches` optimizer updates over one rollout (module docstring). The state
    is donated. sampler_logp [N,T]: the sampler's log-probs; with them the metrics hold the sampler/trainer drift
    (sampler_logp_abs_diff, sampler_kl) and loss.tis_cap / loss.is_mask_band correct for it
    (grpo.policy_loss); they are required when either is set.

    metrics: means over the updates (loss, pg_loss, kl, clip_frac[_low/_high], ratio_mean, grad_norm, lr,
    aux_loss) plus `clip_frac_last` (the last update's, where the ratio has moved furthest from 1).
    With one update per rollout (`fused`: μ = mini_batches = 1) π_old is the update's own forward,
    old_logp = stop_gradient(logp) (the same numbers a separate pass would give, one forward less): pass
    old_logp=None; `metrics` then also hold `entropy` and logp_before is that logp [N,T]. Otherwise pass
    old_logp from `make_scorer` and logp_before is old_logp. ref_logp: None when loss.beta == 0.
    loss.micro_batches > 1 accumulates each mini-batch's gradient over that many parts (module docstring).
    pack: the batch is packed (pack_batch): every per-row argument and logp_before are in its [R, K, ...]
    layout, and mini- / micro-batches are sets of whole packed sequences."""
    tx, schedule = make_optimizer(cfg, opt_key, total_steps)
    shardings = state_lib.state_shardings(cfg, tx, mesh, rules)
    rows1, rows2 = _rows(mesh, rules, 1 + pack), _rows(mesh, rules, 2 + pack)
    rows_of = flat_rows if pack else (lambda x: x)  # the loss's [rows, ...] view of a per-row array
    replicated = NamedSharding(mesh, P())
    n_mb, n_micro = loss.mini_batches, loss.micro_batches
    fused = loss.updates_per_rollout == 1

    def minibatch_loss(params, mb, weights=(1.0, 1.0)):
        """The loss of rows `mb`, its GRPO part times weights[0] and the balance loss times weights[1]."""
        logp_nt, aux = completion_logprobs(params, mb, cfg, loss.temperature, with_entropy=fused)
        old_logp = jax.lax.stop_gradient(logp_nt) if fused else mb["old_logp"]
        value, metrics = grpo.policy_loss(
            rows_of(logp_nt), rows_of(old_logp), rows_of(mb["ref_logp"]) if loss.beta else None,
            rows_of(mb["advantages"]), rows_of(mb["mask"]), eps_low=loss.eps_low, eps_high=loss.eps_high,
            beta=loss.beta, agg=loss.agg, max_len=loss.max_len, ratio_level=loss.ratio_level,
            sampler_logp=rows_of(mb["sampler_logp"]) if "sampler_logp" in mb else None, tis_cap=loss.tis_cap,
            is_mask_band=loss.is_mask_band, rows=real_rows(mb))
        metrics["aux_loss"] = aux["aux_loss"]
        if fused:
            mask_nt = mb["mask"]
            metrics["entropy"] = jnp.sum(aux["entropy"] * mask_nt) / jnp.maximum(jnp.sum(mask_nt), 1.0)
        return weights[0] * value + weights[1] * aux["aux_loss"], (metrics, aux.get("expert_load"), old_logp)

    grad_fn = jax.value_and_grad(minibatch_loss, has_aux=True)

    def real_rows(rows):
        """The number of real rows (packed: the filled slots; None = all rows, the unpacked layout)."""
        return jnp.sum(rows["start"] >= 0).astype(jnp.float32) if pack else None

    def minibatch_grads(params, mb):
        """(grads, metrics, expert load, old_logp) of one mini-batch, accumulated over n_micro parts: the GRPO
        aggregate's part weighted by its share of the normaliser, token means by their share of the tokens."""
        if n_micro == 1:
            (_, (metrics, load, old_logp)), grads = grad_fn(params, mb)
            return grads, metrics, load, old_logp
        micro = split_rows(mb, n_micro, "rl.micro_batches")
        max_len = loss.max_len or mb["mask"].shape[-1]

        def norm(rows):
            return grpo.aggregate_normaliser(rows_of(rows["mask"]), loss.agg, max_len, rows=real_rows(rows))

        w_loss = jax.vmap(norm)(micro) / norm(mb)  # [micro]
        w_tokens = (jnp.maximum(micro["mask"].reshape(n_micro, -1).sum(axis=1), 1.0)
                    / jnp.maximum(mb["mask"].sum(), 1.0))

        def body(grads, part):
            rows, w_l, w_t = part
            (_, (metrics, load, old_logp)), g = grad_fn(params, rows, (w_l, 1.0 / n_micro))
            metrics = {k: v * (w_l if k in ("loss", "pg_loss") else 1.0 / n_micro if k == "aux_loss" else w_t)
                       for k, v in metrics.items()}
            return jax.tree.map(jnp.add, grads, g), (metrics, load, old_logp)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (metrics, load, old_logp) = jax.lax.scan(body, zeros, (micro, w_loss, w_tokens))
        load = None if load is None else jnp.mean(load, axis=0)
        return grads, jax.tree.map(lambda x: jnp.sum(x, axis=0), metrics), load, merge_rows(old_logp)

    def update(state: TrainState, batch, old_logp, ref_logp, advantages, key, sampler_logp):
        n = advantages.shape[0]
        if n % n_mb:
            raise ValueError(f"{n} rows are not divisible into rl.mini_batches={n_mb}")
        rows = {**batch, "advantages": advantages}
        rows.update({} if old_logp is None else {"old_logp": old_logp})
        rows.update({} if ref_logp is None else {"ref_logp": ref_logp})
        rows.update({} if sampler_logp is None else {"sampler_logp": sampler_logp})
        order = jnp.stack([jax.random.permutation(jax.random.fold_in(key, e), n) for e in range(loss.mu)])
        order = order.reshape(loss.mu * n_mb, n // n_mb)  # [updates, rows per mini-batch]

        def body(carry, idx):
            params, opt_state, step = carry
            mb = jax.tree.map(lambda x: x[idx], rows)
            grads, metrics, load, mb_old_logp = minibatch_grads(params, mb)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if load is not None:
                params = models.update_router_bias(params, load, cfg.bias_update_rate)
            metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
            return (params, opt_state, step + 1), (metrics, mb_old_logp)

        (params, opt_state, step), (per_update, old_u) = jax.lax.scan(
            body, (state.params, state.opt_state, state.step), order)
        metrics = jax.tree.map(jnp.mean, per_update)
        metrics["clip_frac_last"] = per_update["clip_frac"][-1]
        logp_before = jnp.zeros_like(old_u[0]).at[order[0]].set(old_u[0]) if fused else old_logp
        return state.replace(params=params, opt_state=opt_state, step=step), metrics, logp_before

    jitted = jax.jit(update, in_shardings=(shardings, batch_shardings(mesh, rules, pack), rows2, rows2, rows1,
                                           replicated, rows2), out_shardings=(shardings, replicated, rows2),
                     donate_argnums=0)

    def run(state, batch, old_logp, ref_logp, advantages, key, sampler_logp=None):
        if (old_logp is None) != fused:
            raise ValueError("make_update: pass old_logp=None exactly when mu = mini_batches = 1")
        if sampler_logp is None and (loss.tis_cap or loss.is_mask_band):
            raise ValueError("rl.tis_cap / rl.is_mask_band correct for the sampler: pass its log-probs "
                             "(sampler_logp)")
        with use_rules(mesh, rules):
            return jitted(state, batch, old_logp, ref_logp, advantages, key, sampler_logp)

    run.tx, run.schedule, run.shardings, run.fused, run.pack = tx, schedule, shardings, fused, pack
    return run


def cast_copy(params, dtype=None) -> Any:
    """A copy of params, its leaves cast to dtype (None = kept) except the router's fp32 leaves (FP32_LEAVES)."""

    def copy(path, x):
        keep = dtype is None or getattr(path[-1], "key", None) in FP32_LEAVES
        return jnp.copy(x) if keep else x.astype(dtype)

    return jax.tree.map_with_path(copy, params)


def copy_params(params, shardings, dtype=None) -> Any:
    """A fresh copy of params in `shardings` (the frozen reference; the policy's buffers are donated).
    dtype (rl.ref_dtype, e.g. "bfloat16"): cast_copy's. With the model's compute dtype it halves an fp32
    reference's memory and changes none of its forward's numbers: the forward casts the weights to the compute
    dtype anyway (the router's fp32 leaves stay fp32)."""
    return jax.jit(functools.partial(cast_copy, dtype=dtype), out_shardings=shardings)(params)
