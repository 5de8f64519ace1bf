"""AOT fit check: compile a stage's jitted steps for a TPU slice from a CPU host; HBM and FLOPs per chip.

    python -m r1jax.aot --config configs/sft.py --topology v5p-512
    python -m r1jax.aot --config configs/r1_zero.py --topology v5p-512 --num_slices 2 --config.rl.mini_batches=32
    python -m r1jax.aot --config configs/r1_zero.py:hf --topology v5p-8 --config.init_from=DIR   # DIR/config.json only

Needs libtpu (`pip install -e .[tpu]`): `jax.experimental.topologies.get_topology_desc` then gives the devices
of the slice without any TPU attached, and `jax.jit(step).lower(abstract sharded inputs).compile()` gives XLA's
`memory_analysis()` and `cost_analysis()` for one chip (docs/reference.md §5). Nothing is allocated: the state, the
batches and the caches are ShapeDtypeStructs carrying the shardings the trainers use.

The steps are the trainers' own jitted functions, built by the trainers' own factories at the config's shapes:
  sft   the SFT train step (r1jax.train.step.make_train_step): micro-batch scan, AdamW update, donated state
  grpo  the policy update (r1jax.rl.trainer.make_update: mu x mini_batches updates in one scan), the log-prob
        pass (make_scorer: pi_old under the policy, pi_ref under the frozen reference, one program), and the
        sampler: with rl.engine = "slots" the slot engine's prefill, chunk and drain compaction
        (r1jax.rl.engine.Engine, S = rl.slots slots), else the static group sampler
        (r1jax.rl.sampler.make_sampler: prefill + the jitted decode while_loop, one program)
A step's HBM is its arguments + outputs - donated aliases + temporaries (+ code). GRPO keeps more alive than one
step's arguments (the policy's optimizer state while sampling, the reference while updating): those arrays are
added as "resident" so the verdict is about the whole stage. Exit code 1 when a step does not fit.

Topologies: Cloud TPU names (v4-512, v5p-512, v5litepod-256 / v5e-256, v6e-256; v4 and v5p count TensorCores,
two per chip) or explicit chip grids (v5p:4x8x8, v6e:16x16).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology; never claim a local accelerator
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the topology client needs no exclusive libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from r1jax import models  # noqa: E402
from r1jax.flops import (FlopCount, causal_block_share, jaxpr_flops, model_flops_per_token,  # noqa: E402
                         skipping_conditionals)
from r1jax.models import moe  # noqa: E402
from r1jax.models.transformer import count_params  # noqa: E402
from r1jax.sharding import ShardingError, make_mesh  # noqa: E402

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float  # HBM per chip
    bf16_tflops: float  # peak, for the time-at-peak estimate
    cores_per_chip: int  # TensorCores counted by the Cloud TPU name (v5p-512 = 256 chips)
    grid_dims: int  # 3 = 3D torus (v4, v5p), 2 = 2D (v5e, v6e)


CHIPS = {
    "v4": Chip(32, 275, 2, 3),
    "v5p": Chip(95, 459, 2, 3),
    "v5e": Chip(16, 197, 1, 2),
    "v6e": Chip(32, 918, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


def parse_topology(name: str) -> tuple[str, str]:
    """(generation, 'gen:AxBxC') for a Cloud TPU name (v5p-512) or an explicit chip grid (v5p:4x8x8)."""
    m = re.fullmatch(r"(v\d+[a-z]*)[-:](\S+)", name.strip().lower())
    if not m or ALIASES.get(m.group(1), m.group(1)) not in CHIPS:
        raise ValueError(f"topology {name!r}: expected e.g. v5p-512, v6e-256, v5litepod-16, v4-128 or v5p:4x8x8 "
                         f"(generations: {sorted(CHIPS)} and {sorted(ALIASES)})")
    gen, rest = ALIASES.get(m.group(1), m.group(1)), m.group(2)
    chip = CHIPS[gen]
    if re.fullmatch(r"\d+(x\d+)+", rest):
        grid = [int(x) for x in rest.split("x")]
    elif rest.isdigit():
        cores = int(rest)
        chips, left = divmod(cores, chip.cores_per_chip)
        if left or chips < 1 or chips & (chips - 1):
            raise ValueError(f"topology {name!r}: {cores} TensorCores is not a power-of-two number of chips "
                             f"({chip.cores_per_chip} cores per chip); name the grid instead, e.g. {gen}:8x8x12")
        grid = [1] * chip.grid_dims
        while math.prod(grid) < chips:  # the Cloud TPU slice shapes: grow the smallest dimension
            grid[grid.index(min(grid))] *= 2
        grid.sort(key=lambda n: (n == 1, n))  # ascending, unit dimensions last: 2x2x1, 2x2x4, 4x8x8
    else:
        raise ValueError(f"topology {name!r}: cannot read the size {rest!r}")
    if len(grid) == 2 and chip.grid_dims == 3:
        grid.append(1)
    return gen, f"{gen}:{'x'.join(map(str, grid))}"


def topology_devices(name: str, num_slices: int = 1) -> tuple[str, list]:
    """(generation, devices) of `num_slices` slices of topology `name`, compile-only (needs libtpu)."""
    from jax.experimental import topologies

    gen, grid = parse_topology(name)
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    if gen == "v4":
        kw["chip_config_name"] = "megacore"  # one JAX device per v4 chip, as on a v4 VM
    try:
        desc = topologies.get_topology_desc(topology_name=grid, platform="tpu", **kw)
    except Exception as e:  # noqa: BLE001 (libtpu missing or refusing: say what to do)
        raise RuntimeError(f"cannot get the devices of {grid} x{num_slices}: {e}\n"
                           "The AOT check needs libtpu: pip install -e .[tpu]") from e
    return gen, list(desc.devices)


# ------------------------------------------------------------------------------------------- the report

@dataclasses.dataclass
class StepReport:
    """Per-chip HBM (bytes) and FLOPs of one compiled step."""

    name: str
    arguments: int
    outputs: int
    aliased: int  # outputs that reuse donated argument buffers
    temporaries: int
    code: int
    resident: int = 0  # arrays the stage keeps alive outside this step's arguments
    flops: float = 0.0  # per step, all chips: matmul FLOPs of the step's jaxpr with loop trip counts
    xla_flops: float = 0.0  # per chip, compiled.cost_analysis(): every loop body counted once
    while_loops: int = 0  # loops of unknown trip count (counted once in `flops`)
    ragged_flops: float = 0.0  # the part of `flops` in ragged_dot (grouped expert matmuls) over whole buffers
    gmm_bound: float = 0.0  # the part of `flops` in the grouped-matmul kernels, at their largest grids
    gmm_balanced: float = 0.0  # those kernels under balanced routing (replacing gmm_bound in balanced_flops)
    conditionals: tuple[int, int] = (0, 0)  # skipping_conditionals of the compiled program
    skippable: float = 0.0  # the part of `flops` in lax.cond branches that may be skipped (attention blocks)
    causal_share: float = 1.0  # of those, the share a causal mask runs (`causal_block_share`)
    tokens: int = 0  # tokens the step processes (global)
    model_flops_per_token: float = 0.0  # 6 x activated params (training) or 2 x (inference)
    note: str = ""
    compiler_error: str = ""  # XLA refused the program (temporaries over HBM): the numbers are lower bounds

    @property
    def balanced_flops(self) -> float:
        """Balanced routing and the causal mask's share of the skippable attention blocks."""
        return self.flops - self.gmm_bound + self.gmm_balanced - self.skippable * (1 - self.causal_share)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.resident

    def fits(self, capacity_bytes: float) -> bool:
        return not self.compiler_error and self.total <= capacity_bytes


def analyze(compiled, name: str, *, jaxpr=None, tokens: int = 0, model_flops_per_token: float = 0.0,
            resident: int = 0, note: str = "", balanced_rows=None, causal_share: float = 1.0) -> StepReport:
    """A StepReport from a compiled executable (`jax.jit(f).trace(...).lower().compile()`) and its jaxpr, or
    from an `OutOfMemory` (the compiler's refusal) in its place. balanced_rows: see `jaxpr_flops`."""
    done = "refused: out of HBM" if isinstance(compiled, OutOfMemory) else "compiled"
    print(f"r1jax.aot: {name}: {done}", file=sys.stderr, flush=True)  # progress: a full-size compile takes minutes
    c = jaxpr_flops(jaxpr, balanced_rows) if jaxpr is not None else FlopCount(0.0)
    counts = dict(resident=int(resident), flops=c.flops, while_loops=c.while_loops, ragged_flops=c.ragged,
                  gmm_bound=c.gmm_bound, gmm_balanced=c.gmm_balanced, skippable=c.skippable,
                  causal_share=causal_share if c.skippable else 1.0, tokens=int(tokens),
                  model_flops_per_token=float(model_flops_per_token), note=note)
    if isinstance(compiled, OutOfMemory):
        return StepReport(name=name, arguments=compiled.arguments, outputs=0, aliased=0,
                          temporaries=compiled.temporaries, code=0, compiler_error=compiled.message, **counts)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return StepReport(
        name=name, arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
        aliased=int(mem.alias_size_in_bytes), temporaries=int(mem.temp_size_in_bytes),
        code=int(mem.generated_code_size_in_bytes), xla_flops=float((cost or {}).get("flops", 0.0)),
        conditionals=skipping_conditionals(compiled.as_text()), **counts)


def format_report(reports: list[StepReport], *, title: str, hbm_gib: float, n_chips: int,
                  peak_tflops: float) -> str:
    """The human-readable report: one block per step, then the verdict line."""
    cap = hbm_gib * GIB
    gib = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    lines = [title, f"HBM per chip: {hbm_gib:g} GiB; {n_chips} chips; peak {peak_tflops:g} bf16 TFLOP/s per chip"]
    for r in reports:
        lines.append(f"\n[{r.name}]" + (f"  ({r.note})" if r.note else ""))
        if r.compiler_error:
            lines.append(f"  compiler: {r.compiler_error}")
            lines.append(f"  HBM per chip (GiB): arguments {gib(r.arguments)}  temporaries {gib(r.temporaries)}  "
                         f"(outputs unknown: the compiler stopped)")
        else:
            lines.append(f"  HBM per chip (GiB): arguments {gib(r.arguments)}  outputs {gib(r.outputs)}  "
                         f"aliased {gib(r.aliased)}  temporaries {gib(r.temporaries)}  code {gib(r.code)}")
        if r.resident:
            lines.append(f"                     resident outside this step {gib(r.resident)}")
        lines.append(f"                     total {'>=' if r.compiler_error else ''}{gib(r.total)} of {hbm_gib:g}  ->  "
                     f"{'fits' if r.fits(cap) else 'DOES NOT FIT'} ({100 * r.total / cap:.0f}%)")
        per_chip = r.flops / n_chips
        at_peak = lambda f: f"{f / n_chips / (peak_tflops * 1e12):.3g} s at peak"  # noqa: E731
        loops = f"; {r.while_loops} while_loop bodies counted once" if r.while_loops else ""
        expect = r.balanced_flops != r.flops
        worst = "worst case: " if expect else ""
        lines.append(f"  FLOPs per step: {worst}{r.flops:.4g} total, {per_chip:.4g} per chip "
                     f"({at_peak(r.flops)}{loops}); XLA cost_analysis {r.xla_flops:.4g} per chip (loop bodies once)")
        if expect:
            lines.append(f"                  expected (balanced routing, causal attention blocks): "
                         f"{r.balanced_flops:.4g} total, {r.balanced_flops / n_chips:.4g} per chip "
                         f"({at_peak(r.balanced_flops)})")
            lines.append(f"    of which grouped expert matmuls (Pallas gmm/tgmm, rows past the group sizes "
                         f"skipped): worst-case bound {r.gmm_bound:.4g} (the kernels' largest grids), balanced "
                         f"routing {r.gmm_balanced:.4g} (their active tiles when every expert gets the same rows)")
        if r.skippable:
            lines.append(f"    of which attention blocks under lax.cond (skipped when no query sees them): "
                         f"{r.skippable:.4g} counted as all run, {r.skippable * r.causal_share:.4g} run under a causal "
                         f"mask ({r.causal_share:.3f} of the blocks)")
        if r.conditionals[0]:
            lines.append(f"    compiled: {r.conditionals[1]} of {r.conditionals[0]} conditionals hold matmuls in one "
                         f"branch only (the chunked attention's masked key blocks are skipped at run time; the "
                         f"count above includes them)")
        if r.ragged_flops:
            lines.append(f"    of which grouped expert matmuls (ragged_dot over whole buffers; under EP the "
                         f"worst-case receive buffer) {r.ragged_flops:.4g}")
        if r.tokens:
            model = max(r.model_flops_per_token, 1)
            per_tok = f"{r.flops / r.tokens:.4g} (ratio {r.flops / r.tokens / model:.2f})"
            if expect:
                per_tok = (f"worst case {per_tok}, expected {r.balanced_flops / r.tokens:.4g} "
                           f"(ratio {r.balanced_flops / r.tokens / model:.2f})")
            lines.append(f"  FLOPs per token: step {per_tok}; model {r.model_flops_per_token:.4g} "
                         f"(6 N + attention; {r.tokens} tokens per step)")
    bad = [r.name for r in reports if not r.fits(cap)]
    lines.append("\n" + ("FITS: every step fits in " if not bad else f"DOES NOT FIT: {', '.join(bad)} exceed ")
                 + f"{hbm_gib:g} GiB per chip")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- sizes and shapes

def bytes_per_chip(tree) -> int:
    """Bytes one chip holds of a pytree of sharded ShapeDtypeStructs / arrays (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def mesh_and_rules(mesh_block, devices):
    """(Mesh over `devices`, rules tuple) from config.mesh, as r1jax.stages.common.mesh_and_rules builds them."""
    mesh = make_mesh(dict(mesh_block.ici), dict(mesh_block.dcn), devices=devices)
    rules = tuple((name, tuple(axes) or None) for name, axes in mesh_block.rules.to_dict().items())
    return mesh, rules


@dataclasses.dataclass
class OutOfMemory:
    """The TPU compiler refuses a program whose temporaries exceed HBM; what it said, and the sizes known."""

    message: str
    arguments: int  # bytes per chip of the step's inputs
    temporaries: int  # the compiler's figure for the temporaries


def _compile(run, args, donate=()):
    """(compiled or OutOfMemory, jaxpr) of a trainer's step function (it activates its own rules when traced)."""
    return _lower(jax.jit(run, donate_argnums=donate).trace(*args), args)


def _lower(traced, args):
    """(compiled or OutOfMemory, jaxpr) of a traced program."""
    try:
        return traced.lower().compile(), traced.jaxpr
    except jax.errors.JaxRuntimeError as e:
        m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        temps = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2))
        return OutOfMemory(str(e).splitlines()[0], bytes_per_chip(args), int(temps)), traced.jaxpr


# ----------------------------------------------------------------------------------------------- stages

def stage_model(config) -> tuple[models.ModelConfig, str]:
    """(the model config a stage of `config` trains, where its architecture comes from). With config.init_from an
    existing Hugging Face directory (only its config.json is read: no weights needed), a Hub id in the local cache
    or an r1jax run, the checkpoint's architecture with the config's training fields (r1jax.train.run.policy_config,
    as the stage itself builds it); else (no init_from, or a preset's placeholder path) config.model's preset."""
    from r1jax.hf.hub import looks_like_hub_id
    from r1jax.train.run import model_config, policy_config

    numerics = model_config(config.model)
    source = config.get("init_from")
    if source and (os.path.exists(os.path.expanduser(source)) or looks_like_hub_id(source)):
        return policy_config(source, numerics), f"init_from {source}"
    return numerics, f"preset {config.model.preset}"


def sft_reports(config, mesh, rules) -> list[StepReport]:
    """The SFT train step at (data.batch_size, data.seq_len) with train.micro_batches."""
    from r1jax.train import optimizer as opt_lib
    from r1jax.train import state as state_lib
    from r1jax.train import step as step_lib

    cfg, _ = stage_model(config)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, cfg, int(config.train.steps))
    shardings = state_lib.state_shardings(cfg, tx, mesh, rules)
    shape = (int(config.data.batch_size), int(config.data.seq_len))
    step = step_lib.make_train_step(cfg, tx, schedule, micro_batches=int(config.train.micro_batches), mesh=mesh,
                                    rules=rules, shardings=shardings, batch_shape=shape)
    state = state_lib.abstract_state(cfg, tx, shardings)
    dtypes = {"loss_mask": jnp.float32}
    batch = {k: _abstract(shape, dtypes.get(k, jnp.int32), step.batch_shardings[k]) for k in step_lib.BATCH_KEYS}
    compiled, jaxpr = _compile(step, (state, batch), donate=(0,))
    return [analyze(compiled, "sft train step", jaxpr=jaxpr, tokens=math.prod(shape),
                    model_flops_per_token=model_flops_per_token(cfg, shape[1], training=True),
                    balanced_rows=functools.partial(moe.balanced_rows, cfg=cfg),
                    causal_share=causal_block_share(shape[1], cfg.attn_block),
                    note=f"batch {shape[0]} x {shape[1]}, {config.train.micro_batches} micro-batches, "
                         f"remat {cfg.remat}")]


def grpo_reports(config, mesh, rules) -> list[StepReport]:
    """The GRPO stage's programs at the largest buckets: policy update, log-prob pass, group sampler."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from r1jax.rl import sampler as sampler_lib
    from r1jax.rl import trainer as trainer_lib
    from r1jax.train import state as state_lib

    rl = config.rl
    cfg, _ = stage_model(config)
    loss = trainer_lib.LossSpec(temperature=float(rl.temperature), eps_low=float(rl.eps_low),
                                eps_high=float(rl.eps_high), beta=float(rl.beta), agg=rl.agg,
                                max_len=int(rl.max_new_tokens), mu=int(rl.mu), mini_batches=int(rl.mini_batches),
                                micro_batches=int(rl.get("micro_batches", 1)))
    chunk_rows, ref_dtype = int(rl.get("score_chunk_rows", 0)), rl.get("ref_dtype", "float32")
    update = trainer_lib.make_update(cfg, trainer_lib.optimizer_key(config.optimizer), int(config.train.steps), loss,
                                     mesh=mesh, rules=rules)
    state = state_lib.abstract_state(cfg, update.tx, update.shardings)
    reference = None  # the frozen copy the stage keeps (trainer.copy_params), in rl.ref_dtype
    if loss.beta:
        ref_dtypes = jax.eval_shape(functools.partial(trainer_lib.cast_copy, dtype=ref_dtype), state.params)
        reference = jax.tree.map(lambda s, r: _abstract(s.shape, r.dtype, s.sharding), state.params, ref_dtypes)
    b, g = int(rl.prompts_per_rollout), int(rl.group_size)
    n, p, t = b * g, max(rl.prompt_buckets), max(rl.completion_buckets)
    rows = trainer_lib.batch_shardings(mesh, rules)["tokens"]
    rows1 = NamedSharding(mesh, P(*rows.spec[:1]))
    replicated = NamedSharding(mesh, P())
    batch = {"tokens": _abstract((n, p + t), jnp.int32, rows), "positions": _abstract((n, p + t), jnp.int32, rows),
             "segment_ids": _abstract((n, p + t), jnp.int32, rows),
             "completion": _abstract((n, t), jnp.int32, rows), "mask": _abstract((n, t), jnp.float32, rows)}
    logp = _abstract((n, t), jnp.float32, rows)
    key = _abstract((2,), jnp.uint32, replicated)
    balanced = functools.partial(moe.balanced_rows, cfg=cfg)
    ref_bytes = bytes_per_chip(reference) if reference is not None else 0
    opt_bytes = bytes_per_chip(state) - bytes_per_chip(state.params)
    out = []

    old_logp = None if update.fused else logp  # one update per rollout: pi_old is the update's own forward
    compiled, jaxpr = _compile(update, (state, batch, old_logp, logp if loss.beta else None,
                                        _abstract((n,), jnp.float32, rows1), key), donate=(0,))
    out.append(analyze(compiled, "grpo policy update", jaxpr=jaxpr, tokens=n * (p + t) * loss.mu,
                       model_flops_per_token=model_flops_per_token(cfg, p + t, training=True), resident=ref_bytes,
                       balanced_rows=balanced, causal_share=causal_block_share(p + t, cfg.attn_block),
                       note=f"{n} rows x {p}+{t} tokens, {loss.mu} x {loss.mini_batches} updates of "
                            f"{loss.micro_batches} micro-batches; resident: the frozen reference ({ref_dtype})"))

    scorer = trainer_lib.make_scorer(cfg, loss.temperature, mesh=mesh, rules=rules, chunk_rows=chunk_rows)
    compiled, jaxpr = _compile(scorer, (state.params, batch))
    out.append(analyze(compiled, "grpo log-prob pass (pi_old, pi_ref)", jaxpr=jaxpr, tokens=n * (p + t),
                       model_flops_per_token=model_flops_per_token(cfg, p + t, training=False),
                       resident=opt_bytes + ref_bytes, balanced_rows=balanced,
                       causal_share=causal_block_share(p + t, cfg.attn_block),
                       note=f"chunks of {chunk_rows or n} rows; resident: the optimizer state and the reference"))

    spec = sampler_lib.SamplerSpec(method=sampler_lib.method_from_config(rl.sampling, float(rl.temperature),
                                                                        rl.top_k, rl.top_p),
                                   group_size=g, max_new_tokens=int(rl.max_new_tokens), eos_id=1, pad_id=0,
                                   stop_sequences=((2,),))
    if rl.get("engine", "static") == "slots":
        return out + engine_reports(config, cfg, spec, state.params, mesh, rules, resident=opt_bytes + ref_bytes)
    sample = sampler_lib.make_sampler(cfg, spec, mesh=mesh, rules=rules)
    compiled, jaxpr = _compile(sample, (state.params, _abstract((b, p), jnp.int32, replicated),
                                        _abstract((b,), jnp.int32, replicated), key))
    out.append(analyze(compiled, "grpo sampler (prefill + decode loop)", jaxpr=jaxpr, tokens=b * p + n,
                       model_flops_per_token=model_flops_per_token(cfg, p, training=False),
                       resident=opt_bytes + ref_bytes, balanced_rows=balanced,
                       causal_share=causal_block_share(p, cfg.attn_block),
                       note=f"{b} prompts x G={g}, cache {p}+{int(rl.max_new_tokens)} slots; FLOPs: the prefill "
                            f"and one decode step; resident: the optimizer state and the reference"))
    return out


def engine_reports(config, cfg, spec, params, mesh, rules, *, resident: int) -> list[StepReport]:
    """The slot engine's programs (r1jax.rl.engine, rl.engine = "slots"), the Engine's own jitted pieces at the
    largest buckets: the prefill of the B prompts into the prompt cache, the chunk (decode steps of S = rl.slots
    slots with insertion, the state donated) and the drain's compaction of S slots into S / 2. `resident`: what
    the stage keeps beside them (optimizer state, reference); the compaction also holds the params and the
    prompt cache, which are not its arguments."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from r1jax.rl import engine as engine_lib
    from r1jax.sharding import use_rules

    rl = config.rl
    b, g = int(rl.prompts_per_rollout), int(rl.group_size)
    n, p, t = b * g, max(rl.prompt_buckets), int(rl.max_new_tokens)
    slots = min(int(rl.get("slots", 0)) or n, n)
    engine_spec = dataclasses.replace(engine_lib.spec_from_config(rl), slots=slots)
    engine = engine_lib.Engine(cfg, spec, engine_spec, mesh=mesh, rules=rules)
    replicated = NamedSharding(mesh, P())
    balanced = functools.partial(moe.balanced_rows, cfg=cfg)
    per_position = engine_lib.cache_bytes_per_position(cfg)

    def build(jitted, *args, **static):  # (compiled or OutOfMemory, traced) under the stage's rules
        with use_rules(mesh, rules):
            traced = jitted.trace(*args, **static)
        return _lower(traced, args)[0], traced

    def outputs(compiled, traced):  # the program's outputs as sharded abstract arrays
        return jax.tree.map(lambda s, sh: _abstract(s.shape, s.dtype, sh), traced.out_info,
                            compiled.output_shardings)

    out = []
    prompts_bp, lengths_b = _abstract((b, p), jnp.int32, replicated), _abstract((b,), jnp.int32, replicated)
    compiled, traced = build(engine._prefill, params, prompts_bp, lengths_b, cache_len=p)
    out.append(analyze(compiled, "grpo engine prefill (prompt cache)", jaxpr=traced.jaxpr, tokens=b * p,
                       model_flops_per_token=model_flops_per_token(cfg, p, training=False), resident=resident,
                       balanced_rows=balanced, causal_share=causal_block_share(p, cfg.attn_block),
                       note=f"{b} prompts x {p}; resident: the optimizer state and the reference"))
    if isinstance(compiled, OutOfMemory):
        return out
    prompt_cache, first_bv = outputs(compiled, traced)
    prompts = engine_lib.Prompts(cache=prompt_cache, first_logits=first_bv,
                                 limit=_abstract((n,), jnp.int32, replicated))
    init, init_traced = build(engine._init, slots, n, p + t)
    state = outputs(init, init_traced)
    key = _abstract((2,), jnp.uint32, replicated)
    positions = engine_spec.pages * engine_spec.page if engine_spec.page else slots * (p + t)
    cache_gib = positions * per_position / math.prod(mesh.devices.shape) / GIB
    blocks = (" over the whole cache (decode attention's lax.switch over cache prefixes counts its widest branch)"
              if cfg.decode_block and p + t > cfg.decode_block else "")
    compiled, traced = build(engine._chunk, params, state, prompts, key, shrink=True)
    out.append(analyze(compiled, "grpo engine chunk (decode steps + insertion)", jaxpr=traced.jaxpr, tokens=slots,
                       model_flops_per_token=model_flops_per_token(cfg, p + t, training=False), resident=resident,
                       balanced_rows=balanced,
                       note=f"S={slots} slots, {positions} cache positions ({cache_gib:.2f} GiB/chip), the prompt cache "
                            f"of {b} prompts, N={n} rows; FLOPs: one decode step{blocks}; resident: the optimizer "
                            f"state and the reference"))
    if slots // 2 >= max(1, slots // engine.engine.drain_divisor):
        keep = _abstract((slots // 2,), jnp.int32, replicated)
        compiled, traced = build(engine._compact, state, keep)
        held = bytes_per_chip(params) + bytes_per_chip(prompts)
        out.append(analyze(compiled, "grpo engine drain (compact S -> S/2)", jaxpr=traced.jaxpr,
                           resident=resident + held,
                           note=f"{slots} -> {slots // 2} slots, a copy beside the original; resident: the params, "
                                f"the prompt cache, the optimizer state and the reference"))
    return out


STAGES = {"sft": sft_reports, "grpo": grpo_reports}


def check(config, topology: str, num_slices: int = 1) -> tuple[bool, str, list[StepReport]]:
    """Compile the stage of `config` for `num_slices` x `topology`; (fits, report text, step reports).
    A mesh the config's shapes cannot be sharded over does not fit either (the text says why)."""
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r}: the AOT check knows {sorted(STAGES)}")
    gen, devices = topology_devices(topology, num_slices)
    chip = CHIPS[gen]
    mesh, rules = mesh_and_rules(config.mesh, devices)
    axes = ", ".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "one device"
    cfg, source = stage_model(config)
    title = (f"AOT fit check: stage {config.stage}, model {source} ({count_params(cfg)['total'] / 1e9:.2f}B params), "
             f"{num_slices} x "
             f"{parse_topology(topology)[1]} ({len(devices)} chips), mesh {axes}")
    try:
        reports = STAGES[config.stage](config, mesh, rules)
    except ShardingError as e:
        return False, f"{title}\nDOES NOT FIT: the config cannot be sharded over this mesh: {e}", []
    text = format_report(reports, title=title, hbm_gib=chip.hbm_gib, n_chips=len(devices),
                         peak_tflops=chip.bf16_tflops)
    return all(r.fits(chip.hbm_gib * GIB) for r in reports), text, reports


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "stage config file[:preset]", lock_config=True)
    topology = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-512, v6e-256, v5p:4x8x8")
    num_slices = flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (also --num-slices)")
    mesh_preset = flags.DEFINE_string("mesh_preset", None, "replace config.mesh by configs/mesh_presets.py NAME")
    flags.mark_flags_as_required(["config", "topology"])

    def run(args) -> int:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        config = config_flag.value
        if mesh_preset.value:
            from configs import mesh_presets

            with config.unlocked():
                config.mesh = mesh_presets.get(mesh_preset.value)
        fits, text, _ = check(config, topology.value, num_slices.value)
        print(text, flush=True)
        return 0 if fits else 1

    argv = [a.replace("--num-slices", "--num_slices", 1) if a.startswith("--num-slices") else a
            for a in (sys.argv if argv is None else argv)]
    app.run(run, argv=argv)  # exits with run's code


if __name__ == "__main__":
    main()
