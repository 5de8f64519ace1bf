"""The whole DeepSeek-R1 recipe (docs/reference.md §4) as one pipeline: stages in order, each naming its inputs as
earlier stages' outputs (`@stage:output`, see r1jax/stages/pipeline.py).

    python -m r1jax.main --config configs/r1.py:tiny --workdir /tmp/r1
    python -m r1jax.main --config configs/r1.py:smoke --workdir /tmp/r1_smoke     # a few steps per stage (CI)
    python -m r1jax.main --config configs/r1.py --workdir gs://BUCKET/r1             # real scale (set the paths)

Stages (docs/stages.md maps them to the paper):
  pretrain            the base model (tiny: tiny_moe on the tiny world; real scale: DeepSeek-V3-Base is given)
  cold_start          SFT of the base on the readable long-CoT samples
  reasoning_rl        GRPO from cold start: accuracy + language consistency
  rm_helpful          reward model on helpfulness pairs (scores the final summary)
  rm_harmless         reward model on harmlessness pairs (scores the whole response)
  rejection_sampling  reasoning-RL samples -> correct, readable SFT data, mixed with non-reasoning data
  sft                 SFT of the *base* on the rejection-sampling dataset
  all_scenario_rl     GRPO from sft over reasoning (rule rewards) + general prompts (reward models)
  student_base        (tiny) the dense student's own pre-training, standing in for Qwen / Llama base models
  distill             SFT of the dense student on the rejection-sampling dataset
  distill_baseline    (tiny) the same student on the data without the teacher's samples (cold start + non-reasoning)
  r1_zero             GRPO from the base, rule rewards, R1-Zero template: its own branch, as in the paper (it feeds
                      no other stage; listed after the main line, which goes first when stages compete for a slot)
  eval                pass@1 (k samples, temperature 0.6, top-p 0.95) and cons@k of every model above
  report              plots per stage and the held-out accuracy table: DIR/report.md

Every field of every stage can be overridden: --config.stages.reasoning_rl.train.steps=30.
--config.parallel=2 runs two stages at once: a stage starts as soon as the stages it reads from have finished, in a
child process of its own (DIR/<nn>_<stage>/stage.log). CPU hosts only; on 2 cores it gains little.
"""

import ml_collections as mlc

from configs import all_scenario_rl, cold_start, common, distill, pretrain, r1_zero, reasoning_rl, rejection_sampling
from configs import eval as eval_config
from configs import reward_model, sft

ORDER = ("pretrain", "cold_start", "reasoning_rl", "rm_helpful", "rm_harmless", "rejection_sampling", "sft",
         "all_scenario_rl", "student_base", "distill", "distill_baseline", "r1_zero", "eval", "report")
R1_ZERO_MODELS = ("pretrain", "r1_zero", "student_base")  # answer in the R1-Zero template


def pipeline_config(order: tuple, stages: dict, *, world: bool, mixes: dict | None = None,
                    vocab_size: int = common.TINY_VOCAB, world_seed: int = 0, parallel: int = 1) -> mlc.ConfigDict:
    """parallel: how many stages run at once when their inputs are ready, each in a child process (CPU only; 1 = one
    after another in this process; r1jax/stages/pipeline.py)."""
    return mlc.ConfigDict(dict(
        stage="pipeline", order=tuple(order), stages=mlc.ConfigDict({n: stages[n] for n in order}), jax_cache=True,
        parallel=parallel,
        world=dict(enabled=world, seed=world_seed, vocab_size=vocab_size), mixes=mlc.ConfigDict(mixes or {})))


def report_config(*, table_benchmark: str) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(stage="report", pipeline_dir="@pipeline:dir", table_benchmark=table_benchmark))


def tiny_stages() -> dict:
    """The tiny pipeline: every stage on the tiny world (DIR/world), every model from the base run."""
    tokenizer = "@world:tokenizer.model"
    rl_files = dict(train_files=("@world:rl_train.jsonl",), eval_files=("@world:rl_heldout.jsonl",))

    s = {}
    s["pretrain"] = pretrain.get_config("tiny")
    s["pretrain"].data.train_files = ("@world:pretrain.jsonl",)
    s["pretrain"].data.tokenizer = tokenizer

    s["r1_zero"] = r1_zero.get_config("tiny")
    s["r1_zero"].init_from = "@pretrain:checkpoint"
    s["r1_zero"].data.update(rl_files)
    s["r1_zero"].train.update(steps=40, eval_every=20)  # +24 points by update 30 in the 90-update preset's runs

    s["cold_start"] = cold_start.get_config("tiny")
    s["cold_start"].init_from = "@pretrain:checkpoint"
    s["cold_start"].data.train_files = ("@world:cold_start.jsonl",)

    s["reasoning_rl"] = reasoning_rl.get_config("tiny")
    s["reasoning_rl"].init_from = "@cold_start:checkpoint"
    s["reasoning_rl"].data.update(rl_files)

    for aspect in ("helpful", "harmless"):
        rm = reward_model.get_config("tiny")
        rm.init_from = "@pretrain:checkpoint"
        rm.rm.aspect = aspect
        rm.data.update(train_files=("@world:preferences_train.jsonl",),
                       eval_files=("@world:preferences_heldout.jsonl",))
        s[f"rm_{aspect}"] = rm

    s["rejection_sampling"] = rejection_sampling.get_config("tiny")
    s["rejection_sampling"].init_from = "@reasoning_rl:checkpoint"
    # every rl_train and code_train prompt (~3200 kept samples, twice the cold-start set): with the first 600 of
    # each file the distilled student did not beat the cold-start baseline (docs/results.md)
    s["rejection_sampling"].data.update(prompt_files=("@world:rl_train.jsonl", "@world:code_train.jsonl"),
                                        non_reasoning_files=("@world:non_reasoning.jsonl",))

    s["sft"] = sft.get_config("tiny")
    s["sft"].init_from = "@pretrain:checkpoint"  # R1 fine-tunes the *base* model on the ~800k samples
    s["sft"].data.train_files = ("@rejection_sampling:dataset",)

    s["all_scenario_rl"] = all_scenario_rl.get_config("tiny")
    s["all_scenario_rl"].init_from = "@sft:checkpoint"
    s["all_scenario_rl"].data.update(train_files=("@mix:all_scenario_prompts",), eval_files=rl_files["eval_files"])
    s["all_scenario_rl"].rl.rewards = all_scenario_rl.rewards("@rm_helpful:checkpoint", "@rm_harmless:checkpoint")
    s["all_scenario_rl"].train.update(steps=30, eval_every=15)

    s["student_base"] = pretrain.get_config("tiny")
    s["student_base"].model = common.tiny_model("tiny_dense")
    s["student_base"].train.steps = 600  # it only anchors the distill comparison (both students start from it)
    s["student_base"].data.train_files = ("@world:pretrain.jsonl",)
    s["student_base"].data.tokenizer = tokenizer

    for name, files in (("distill", ("@rejection_sampling:dataset",)),
                        ("distill_baseline", ("@world:cold_start.jsonl", "@world:non_reasoning.jsonl"))):
        s[name] = distill.get_config("tiny")
        s[name].init_from = "@student_base:checkpoint"
        s[name].data.train_files = files

    models = {name: eval_config.model_entry(
        f"@{name}:checkpoint", template="r1_zero" if name in R1_ZERO_MODELS else "raw",
        stop_strings=("</answer>",) if name in R1_ZERO_MODELS else ())
        for name in ORDER if name not in ("rm_helpful", "rm_harmless", "rejection_sampling", "eval", "report")}
    s["eval"] = eval_config.get_config("tiny")
    s["eval"].models = mlc.ConfigDict(models)
    s["eval"].order = tuple(models)
    s["eval"].benchmarks.rl_heldout.files = ("@world:rl_heldout.jsonl",)
    s["eval"].benchmarks.code_heldout.files = ("@world:code_heldout.jsonl",)
    s["eval"].benchmarks.rl_heldout.limit = 100  # x 4 samples: standard error ~2.5 points
    s["eval"].benchmarks.code_heldout.limit = 20  # every code sample runs in the sandbox (~0.3 s each)

    s["report"] = report_config(table_benchmark="rl_heldout")
    return s


TINY_MIXES = {"all_scenario_prompts": dict(files=("@world:rl_train.jsonl", "@world:general_prompts.jsonl"),
                                           max_per_file=(700, 0))}


def smoke(stages: dict) -> dict:
    """A few steps / samples per stage and 2-layer models (the CI smoke test of the whole pipeline). Shapes are
    shared where the stages allow it, so the compilation cache serves repeated programs."""
    for name, c in stages.items():
        if "model" in c:
            c.model.overrides.n_layers = 2
            if c.model.preset == "tiny_dense":
                c.model.overrides.n_dense_layers = 2
    for name in ("pretrain", "student_base", "cold_start", "sft", "distill", "distill_baseline"):
        c = stages[name]
        c.train.update(steps=3, log_every=1, eval_every=0, checkpoint_every=2, progress=False)
        c.optimizer.warmup_steps = 1
        c.data.update(batch_size=4, seq_len=128, eval_holdout=0)
    for name in ("r1_zero", "reasoning_rl", "all_scenario_rl"):
        c = stages[name]
        c.rl.update(group_size=2, prompts_per_rollout=4, max_new_tokens=16, completion_buckets=(16,))
        c.eval.update(num_prompts=4, samples=2, batch_prompts=4, at_start=False)
        c.train.update(steps=3, log_every=1, eval_every=0, checkpoint_every=2, progress=False)
        c.optimizer.warmup_steps = 1
    for name in ("rm_helpful", "rm_harmless"):
        c = stages[name]
        c.train.update(steps=3, log_every=1, eval_every=3, checkpoint_every=2, progress=False)
        c.optimizer.warmup_steps = 1
        c.data.update(batch_size=4, seq_len=96)
    sampling = dict(samples=2, max_new_tokens=16, batch_prompts=4, method="top_p", temperature=0.6, top_p=0.95)
    rs = stages["rejection_sampling"]
    rs.data.max_prompts_per_file = 6
    rs.sampling.update(sampling)
    rs.output.chunk_prompts = 4
    # a random policy keeps no sample: the SFT stages also see the non-reasoning set itself
    for name in ("sft", "distill"):
        stages[name].data.train_files = ("@rejection_sampling:dataset", "@world:non_reasoning.jsonl")
    ev = stages["eval"]
    ev.sampling.update(sampling)
    ev.benchmarks.rl_heldout.limit = 8
    ev.benchmarks.code_heldout.limit = 4
    return stages


def get_config(arg=None):
    if arg in ("tiny", "smoke"):
        stages = tiny_stages()
        # one stage after another, progress bars on the console: on 2 cores two stages side by side gain ~0-15%
        # (docs/results.md)
        return pipeline_config(ORDER, smoke(stages) if arg == "smoke" else stages, world=True, mixes=TINY_MIXES)
    if arg not in (None, ""):
        raise ValueError(f"configs/r1.py: unknown preset {arg!r}; expected '', 'tiny' or 'smoke'")
    return pipeline_config(REAL_ORDER, real_stages(), world=False, mixes=REAL_MIXES)


# ------------------------------------------------------------------------------------------ real scale

REAL_ORDER = ("cold_start", "reasoning_rl", "rm_helpful", "rm_harmless", "rejection_sampling", "sft",
              "all_scenario_rl", "distill", "r1_zero", "eval", "report")
REAL_MIXES = {"all_scenario_prompts": dict(files=("/path/to/reasoning_prompts.jsonl", "/path/to/general_prompts.jsonl"),
                                           max_per_file=())}


def real_stages() -> dict:
    """DeepSeek-V3-Base is given (an HF directory), so there is no pretrain stage; one distilled student
    (configs/distill.py presets name the others)."""
    s = {"r1_zero": r1_zero.get_config(), "cold_start": cold_start.get_config(),
         "reasoning_rl": reasoning_rl.get_config()}
    s["reasoning_rl"].init_from = "@cold_start:checkpoint"
    for aspect in ("helpful", "harmless"):
        rm = reward_model.get_config()
        rm.rm.aspect = aspect
        s[f"rm_{aspect}"] = rm
    s["rejection_sampling"] = rejection_sampling.get_config()
    s["rejection_sampling"].init_from = "@reasoning_rl:checkpoint"
    s["sft"] = sft.get_config()
    s["sft"].data.train_files = ("@rejection_sampling:dataset",)
    s["all_scenario_rl"] = all_scenario_rl.get_config()
    s["all_scenario_rl"].init_from = "@sft:checkpoint"
    s["all_scenario_rl"].data.train_files = ("@mix:all_scenario_prompts",)
    s["all_scenario_rl"].rl.rewards = all_scenario_rl.rewards("@rm_helpful:checkpoint", "@rm_harmless:checkpoint")
    s["distill"] = distill.get_config()
    s["distill"].data.train_files = ("@rejection_sampling:dataset",)
    s["distill"].data.eval_files = ()
    s["distill"].data.eval_holdout = 2000
    s["eval"] = eval_config.get_config()
    s["eval"].models = mlc.ConfigDict({
        "r1_zero": eval_config.model_entry("@r1_zero:checkpoint", template="r1_zero", stop_strings=("</answer>",)),
        **{n: eval_config.model_entry(f"@{n}:checkpoint") for n in ("cold_start", "reasoning_rl", "sft",
                                                                     "all_scenario_rl", "distill")}})
    s["eval"].order = ("r1_zero", "cold_start", "reasoning_rl", "sft", "all_scenario_rl", "distill")
    s["report"] = report_config(table_benchmark="aime2024")
    return s
