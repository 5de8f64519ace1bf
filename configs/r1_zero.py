"""R1-Zero (docs/reference.md §4.1): GRPO straight from the base model, rule rewards only (accuracy + format), the
R1-Zero template.

    python -m r1jax.main --config configs/r1_zero.py:tiny --workdir /tmp/r1_zero --config.init_from=/tmp/base
    python -m r1jax.main --config configs/r1_zero.py --workdir gs://BUCKET/r1_zero \
        --config.init_from=/path/to/DeepSeek-V3-Base --config.data.train_files=/path/to/rl_prompts.jsonl
    python -m r1jax.main --config configs/r1_zero.py:hf --workdir W --config.init_from=DIR --config.data.train_files=F

tiny: the tiny world's rl_train / rl_heldout arithmetic and countdown questions (`prompt` already holds the
R1-Zero prompt). The base model is a `configs/pretrain.py:tiny` run, given by --config.init_from (unset: a fresh
init); configs/r1.py chains the two stages (the pipeline is the one way to chain stages).
Default: DeepSeek-V3 671B from its HF base checkpoint with the R1 settings of docs/reference.md §3.
hf: any Hugging Face base checkpoint (e.g. Qwen2.5-Math-1.5B / 7B) on one TPU host with SimpleRL-Zoo's recipe
(hf_config below); MATH-style records by default (`problem`, reference in `solution`; GSM8K:
--config.data.prompt_field=question --config.data.answer_field=answer).

The same stage runs reasoning-oriented RL and all-scenario RL with other values, e.g. reasoning RL:
    rl.rewards = (("accuracy", 1.0), ("language_consistency", 1.0)), init_from = the cold-start run,
    data.template = "chat"; all-scenario RL adds reward-model rewards to rl.rewards.
"""

import ml_collections as mlc
from ml_collections.config_dict import placeholder

from configs import common, mesh_presets


def rl_block(*, group_size: int, prompts_per_rollout: int, max_new_tokens: int, prompt_buckets: tuple,
             completion_buckets: tuple, rewards: tuple, temperature: float = 1.0, beta: float = 0.0,
             eps_low: float = 0.2, eps_high: float = 0.2, agg: str = "seq-mean-token-mean", mu: int = 1,
             mini_batches: int = 1, stop_strings: tuple = ("</answer>",), sampling: str = "temperature",
             top_k: int = 0, top_p: float = 1.0, adv_scale: str = "group", adv_baseline: str = "mean",
             mask_truncated: bool = False, dynamic_sampling: bool = False, dynamic_max_batches: int = 3,
             ref_reset_every: int = 0, micro_batches: int = 1, score_chunk_rows: int = 0,
             ref_dtype: str = "float32", engine: str = "slots", slots: int = 0, chunk_steps: int = 256,
             page: int = 0, pages: int = 0, ratio_level: str = "token", tis_cap: float = 0.0, is_mask_band: tuple = (),
             pack: bool = False) -> mlc.ConfigDict:
    """config.rl: sampling, rewards and the GRPO loss (r1jax/stages/grpo.py documents every field).

    rewards: (name, weight) or (name, weight, kwargs) with names from r1jax.rl.rewards.BUILTINS, or plug-ins 'path/file.py:fn' / 'pkg.mod:fn'.
    prompts_per_rollout x group_size samples per rollout, split into mini_batches optimizer updates, mu times.
    Memory at long completions (r1jax/rl/trainer.py): micro_batches = gradient accumulation steps inside a
    mini-batch; score_chunk_rows = rows per forward of the log-prob pass (0 = the whole rollout at once);
    ref_dtype = the frozen reference's dtype (bfloat16 halves it; the forward computes in the model's dtype).
    pack: the trainer packs the rollout's rows (prompt + completion) first-fit into sequences of the prompt +
      completion bucket (r1jax/rl/trainer.py), so the update and the log-prob pass skip most of the padding of
      long-tailed lengths; the loss is the same (exactly so with one mini-batch); mini-batches, micro-batches
      and score_chunk_rows then count packed sequences. It pays where completions are long-tailed against their
      bucket (python -m r1jax.bench.rollout: update 2.22 s -> 1.00 s). Off in the tiny presets, where it was
      measured not to pay (docs/results.md: prompts nearly fill their bucket, and each new packed shape costs
      a compile), and in the full-scale presets (r1jax/aot.py compiles the padded layout).
    sampling: greedy | temperature | top_k | top_p (with top_k / top_p), always at `temperature`.
    engine: "slots" (r1jax/rl/engine.py: `slots` decode slots, 0 = one per rollout row, at most `chunk_steps`
      decode steps between host checks; page > 0: a paged cache of `pages` pages of `page` positions shared by
      the slots, one device, engine.pages_for_budget sizes it) or "static" (r1jax/rl/sampler.py, every row of a
      batch until the longest ends).
    ratio_level "token" | "sequence" (GSPO); tis_cap > 0: truncated importance sampling of the sampler's drift;
      is_mask_band (lo, hi): drop rows whose sampler ratio leaves it (r1jax/rl/grpo.py).
    prompt_buckets / completion_buckets: padded lengths; one compile per bucket; max_new_tokens is the
      sampler's limit, completion_buckets[-1] must be >= it.
    """
    if max(completion_buckets) < max_new_tokens:
        raise ValueError(f"completion_buckets {completion_buckets} must reach max_new_tokens={max_new_tokens}")
    return mlc.ConfigDict(dict(
        group_size=group_size, prompts_per_rollout=prompts_per_rollout, max_new_tokens=max_new_tokens,
        prompt_buckets=tuple(prompt_buckets), completion_buckets=tuple(completion_buckets),
        rewards=tuple(rewards), stop_strings=tuple(stop_strings), sampling=sampling, temperature=temperature,
        top_k=top_k, top_p=top_p, beta=beta, eps_low=eps_low, eps_high=eps_high, agg=agg, mu=mu,
        mini_batches=mini_batches, adv_scale=adv_scale, adv_baseline=adv_baseline, mask_truncated=mask_truncated,
        dynamic_sampling=dynamic_sampling, dynamic_max_batches=dynamic_max_batches,
        ref_reset_every=ref_reset_every, micro_batches=micro_batches, score_chunk_rows=score_chunk_rows,
        ref_dtype=ref_dtype, engine=engine, slots=slots, chunk_steps=chunk_steps, page=page, pages=pages,
        ratio_level=ratio_level,
        tis_cap=tis_cap, is_mask_band=tuple(is_mask_band), pack=pack))


def eval_block(*, num_prompts: int, samples: int, batch_prompts: int, sampling: str = "top_p",
               temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0, at_start: bool = True):
    """config.eval: held-out accuracy (pass@1 over `samples` per question) and format rate on the first
    num_prompts held-out prompts, every train.eval_every updates (and before the first with at_start).
    R1 evaluates at temperature 0.6, top-p 0.95 (docs/reference.md §4)."""
    return mlc.ConfigDict(dict(num_prompts=num_prompts, samples=samples, batch_prompts=batch_prompts,
                               sampling=sampling, temperature=temperature, top_p=top_p, top_k=top_k,
                               at_start=at_start))


def data_block(*, train_files: tuple = (), eval_files: tuple = (), tokenizer: str | None = None,
               prompt_field: str = "prompt", answer_field: str = "answer", messages_field: str | None = None,
               system_field: str | None = None, system: str | None = None, template: str = "",
               tiny_world: bool = False,
               world_files: tuple = ("rl_train",), eval_world_files: tuple = ("rl_heldout",), world_seed: int = 0):
    """config.data: prompt files (JSONL / Parquet / ArrayRecord), their other columns become reward fields.
    template: "checkpoint" (the checkpoint's own chat template), a name in r1jax.data.templates.TEMPLATES
    ("r1_zero" for base models) applied to prompt_field, or "" when the field already holds the rendered prompt
    (the tiny world's rl files). tokenizer None = the initial checkpoint's.
    answer_field: the column the rewards read as the reference (as `answer`: GSM8K's "#### 72", MATH's solution
    with \\boxed{}, or bare); messages_field (None = not read): a conversation rendered as the prompt instead of
    prompt_field (up to its last non-assistant turn); system_field: a column with a system prompt; system: one
    system prompt for every record (the column wins where it is set)."""
    return mlc.ConfigDict(dict(
        train_files=tuple(train_files), eval_files=tuple(eval_files),
        tokenizer=tokenizer if tokenizer is not None else placeholder(str), prompt_field=prompt_field,
        answer_field=answer_field, messages_field=messages_field if messages_field is not None else placeholder(str),
        system_field=system_field if system_field is not None else placeholder(str),
        system=system if system is not None else placeholder(str), template=template, tiny_world=tiny_world,
        world_files=tuple(world_files),
        eval_world_files=tuple(eval_world_files), world_seed=world_seed))


def grpo_config(*, model_block, data, rl, eval_, optimizer_block, train_block, mesh_block=None,
                init_from: str | None = None, seed: int = 0) -> mlc.ConfigDict:
    """A complete config for the `grpo` stage (R1-Zero, reasoning RL and all-scenario RL use it)."""
    return mlc.ConfigDict(dict(
        stage="grpo", seed=seed, model=model_block, mesh=mesh_block if mesh_block is not None else common.mesh(),
        init_from=init_from if init_from is not None else placeholder(str),
        data=data, rl=rl, eval=eval_, optimizer=optimizer_block, train=train_block))


R1_ZERO_REWARDS = (("accuracy", 1.0), ("format", 1.0))


def get_config(arg=None):
    if arg == "tiny":
        return grpo_config(
            model_block=common.tiny_model("tiny_moe", bias_update_rate=0.0),
            data=data_block(tiny_world=True),
            # Tiny-scale choices (docs/results.md): the accuracy reward weighs 8x the format one and DAPO's dynamic
            # sampling keeps only groups with a signal -- with equal weights every group learned the format in ~10
            # updates at the expense of accuracy; lr 1.5e-4 (3e-4 lost accuracy, 1e-4 gained less in 60 updates);
            # 90 updates (held-out accuracy peaked between 90 and 120).
            rl=rl_block(group_size=8, prompts_per_rollout=16, max_new_tokens=96, prompt_buckets=(128,),
                        completion_buckets=(48, 96), rewards=(("accuracy", 2.0), ("format", 0.25)),
                        temperature=1.0, beta=0.0, agg="token-mean", dynamic_sampling=True,
                        dynamic_max_batches=3, slots=64),  # 128 rows per rollout through 64 slots
            eval_=eval_block(num_prompts=96, samples=4, batch_prompts=32),
            optimizer_block=common.optimizer(1.5e-4, 5, schedule="constant", weight_decay=0.0),
            train_block=common.train(90, log_every=1, eval_every=30, checkpoint_every=30, keep_checkpoints=2))
    if arg == "hf":
        return hf_config()
    if arg not in (None, ""):
        raise ValueError(f"configs/r1_zero.py: unknown preset {arg!r}; expected '', 'tiny' or 'hf'")
    # R1 settings (docs/reference.md §3, from the later full paper; secondary sources, *unverified*): lr 3e-6,
    # beta 0.001, G 16, 32 questions (512 samples) per update, temperature 1.0, max length 32768, ~10.4k
    # updates; each rollout of 8192 samples split into 16 mini-batches, one pass; reference replaced by the
    # policy every 400 steps; clip eps 10. Optimizer betas / decay / warmup are not published (*unverified*).
    return grpo_config(
        model_block=common.model("deepseek_v3_671b", bias_update_rate=0.0, mtp_depth=0),
        mesh_block=mesh_presets.get(mesh_presets.V5P_671B),
        init_from="/path/to/DeepSeek-V3-Base",  # HF directory of the base model (docs/reference.md §4.1)
        data=data_block(train_files=("/path/to/rl_prompts.jsonl",), eval_files=("/path/to/aime2024.jsonl",),
                        prompt_field="question", template="r1_zero"),
        rl=rl_block(group_size=16, prompts_per_rollout=512, mini_batches=16, mu=1, max_new_tokens=32768,
                    prompt_buckets=(512, 1024, 2048), completion_buckets=(4096, 8192, 16384, 32768),
                    rewards=R1_ZERO_REWARDS, temperature=1.0, beta=0.001,
                    eps_low=10.0, eps_high=10.0,  # *unverified*
                    agg="seq-mean-token-mean", ref_reset_every=400,  # ref reset: *unverified*
                    score_chunk_rows=32, ref_dtype="bfloat16",  # log-prob pass per mini-batch of 32 rows
                    micro_batches=16,  # a mini-batch of 512 rows in 16 parts of 32: one row per (fsdp x expert) shard
                    # The slot engine's S from the HBM left on a v5p-512 chip (95 GiB) beside the resident params
                    # (10.9), Adam state (21.7; 10.9 with the bf16 moments below) and bf16 reference (5.5): ~57 GiB
                    # (~68 with bf16 moments) for the caches and temporaries.
                    # A slot's cache is 2048 + 32768 positions x 70 KB (MLA latent, 61 layers) = 2.4 GB, split over
                    # the 256 chips; the drain's compaction holds S and S/2 slots at once (1.5 x S's cache), so
                    # S = 4096 (36.5 + 18.2 GiB of caches) leaves no room and S = 2048 (18.2 + 9.1) does;
                    # a multiple of 2048 so that S/8, the drain's end, still splits over the 256 chips
                    # (docs/sharding.md has the compiled numbers: python -m r1jax.aot --config configs/r1_zero.py).
                    slots=2048),
        eval_=eval_block(num_prompts=30, samples=16, batch_prompts=30),  # AIME 2024; R1 uses k=64
        optimizer_block=common.optimizer(3e-6, 0, schedule="constant", b2=0.95, weight_decay=0.1,
                                         clip_norm=1.0,  # betas / decay / clip *unverified*
                                         # Adam moments in bf16 as DeepSeek-V3 trains (docs/reference.md §5):
                                         # the gradient accumulator of 16 micro-batches needs the 10.9 GiB per chip
                                         moment_dtype="bfloat16"),
        train_block=common.train(10400, log_every=1, eval_every=400, checkpoint_every=100))


def hf_config(*, template: str = "r1_zero", rewards: tuple = R1_ZERO_REWARDS):
    """The :hf preset: GRPO on a Hugging Face checkpoint on one TPU host, with the defaults of SimpleRL-Zoo's
    training script (hkust-nlp/simpleRL-reason train_grpo_math_tune_ray.sh, verl, Qwen2.5-Math-7B; Zeng et al.,
    arXiv:2503.18892): lr 5e-7 (constant), 8 samples per prompt, prompts up to 1024 tokens and completions up to
    3072, temperature 1.0, clip 0.2, the k3 KL as a loss term with beta 0.001 (verl's low_var_kl), one policy
    update per rollout (ppo_mini_batch_size = train_batch_size), verl's token-mean loss and AdamW defaults
    (betas 0.9 / 0.999, weight decay 0.01, gradient clipping 1.0). Departures: 64 prompts per rollout instead of
    256, so that the sampler's cache of 512 rows x 4096 tokens fits one v5p-8 with a 7B model; no entropy bonus
    (the script's 0.001). Rewards and template are R1-Zero's (accuracy + format, docs/reference.md §4 step 1);
    SimpleRL-Zoo rewards correctness only: --config.rl.rewards='(("accuracy", 1.0),)'."""
    return grpo_config(
        model_block=common.hf_model(), init_from=common.HF_CHECKPOINT,
        data=data_block(train_files=("/path/to/train.jsonl",), prompt_field="problem", answer_field="solution",
                        template=template),
        rl=rl_block(group_size=8, prompts_per_rollout=64, max_new_tokens=3072, prompt_buckets=(256, 512, 1024),
                    completion_buckets=(1024, 2048, 3072), rewards=rewards, temperature=1.0, beta=0.001,
                    eps_low=0.2, eps_high=0.2, agg="token-mean", mu=1, mini_batches=1,
                    micro_batches=32, score_chunk_rows=16, ref_dtype="bfloat16",  # 16 rows per pass
                    # The slot engine in the static sampler's 512 x 4096 cache positions less the prompt cache of
                    # 64 x 1024 (engine.slots_for_budget: 496), down to a multiple of 32 so that S/8 still splits
                    # over a v5p-8's 4 chips.
                    slots=480),
        eval_=eval_block(num_prompts=128, samples=4, batch_prompts=64),
        optimizer_block=common.optimizer(5e-7, 0, schedule="constant", b2=0.999, weight_decay=0.01, clip_norm=1.0),
        train_block=common.train(1000, log_every=1, eval_every=50, checkpoint_every=50))
