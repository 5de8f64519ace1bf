"""All-scenario RL (docs/reference.md §4 step 5): GRPO on a mix of reasoning prompts (rule rewards) and general prompts
(reward models: helpfulness judged on the final summary only, harmlessness on the whole response).

    python -m r1jax.main --config configs/all_scenario_rl.py:tiny,helpful=/tmp/rm_helpful,harmless=/tmp/rm_harmless \
        --workdir /tmp/all_scenario_rl --config.init_from=/tmp/sft --config.data.train_files=/tmp/mixed_prompts.jsonl
    (configs/r1.py wires the SFT run, the two reward-model runs and the prompt mix)
    python -m r1jax.main --config configs/all_scenario_rl.py:hf,helpful=RM1,harmless=RM2 --workdir W \
        --config.init_from=DIR --config.data.train_files=F

The reward source is chosen per sample from the dataset's `reward_source` field by the `by_source` reward
(r1jax/rl/reward_model.py): `rule` samples get answer_accuracy + language_consistency, `reward_model` samples the
helpful RM (summary only) plus the harmless RM (whole response), each loaded once from its run directory (the
preset's `helpful=` / `harmless=` arguments). The prompt file must give every record the same columns
(configs/r1.py writes such a mix of rl_train and general_prompts with `@mix:`; missing columns are null).
tiny: init_from = a tiny SFT run. Default: the V3-sized SFT checkpoint, R1-Zero's GRPO settings. hf: a Hugging
Face checkpoint of the SFT model on one TPU host, prompts in its own chat template, R1-Zero's :hf settings
(SimpleRL-Zoo's recipe, configs/r1_zero.py hf_config).
"""

from configs import common, r1_zero

RULE_REWARDS = (("answer_accuracy", 1.0), ("language_consistency", 1.0))


def rewards(helpful_rm: str, harmless_rm: str, *, helpful_weight: float = 1.0, harmless_weight: float = 1.0) -> tuple:
    """rl.rewards: one `by_source` spec routing `rule` and `reward_model` samples (RM run directories given)."""
    routes = {"rule": RULE_REWARDS,
              "reward_model": (("reward_model", helpful_weight, {"checkpoint": helpful_rm, "aspect": "helpful"}),
                               ("reward_model", harmless_weight, {"checkpoint": harmless_rm, "aspect": "harmless"}))}
    return (("by_source", 1.0, {"routes": routes}),)


def get_config(arg=None):
    """arg: "[tiny|hf][,helpful=RM_DIR][,harmless=RM_DIR]"."""
    preset, *pairs = (arg or "").split(",")
    paths = {"helpful": "/path/to/rm_helpful", "harmless": "/path/to/rm_harmless"}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in paths or not value:
            raise ValueError(f"configs/all_scenario_rl.py: bad argument {pair!r}; expected helpful=DIR or harmless=DIR")
        paths[key] = value
    if preset == "tiny":
        config = r1_zero.get_config("tiny")
        config.data = r1_zero.data_block(train_files=("/path/to/mixed_prompts.jsonl",), prompt_field="question",
                                         template="raw", tiny_world=True)
        config.rl = r1_zero.rl_block(group_size=8, prompts_per_rollout=16, max_new_tokens=96, prompt_buckets=(64,),
                                     completion_buckets=(48, 96), temperature=1.0, beta=0.0, agg="token-mean",
                                     stop_strings=(), rewards=rewards(paths["helpful"], paths["harmless"]))
        config.optimizer = common.optimizer(1e-4, 5, schedule="constant", weight_decay=0.0)
        config.train = common.train(40, log_every=1, eval_every=20, checkpoint_every=10, keep_checkpoints=2)
        return config
    if preset == "hf":
        config = r1_zero.hf_config(template=common.CHECKPOINT_TEMPLATE, rewards=rewards(paths["helpful"],
                                                                                      paths["harmless"]))
        config.data.prompt_field = "question"
        config.rl.stop_strings = ()
        return config
    if preset:
        raise ValueError(f"configs/all_scenario_rl.py: unknown preset {preset!r}; expected '', 'tiny' or 'hf'")
    config = r1_zero.get_config()
    config.init_from = "/path/to/sft"  # the 800k-SFT run
    config.data = r1_zero.data_block(train_files=("/path/to/all_scenario_prompts.jsonl",),
                                     eval_files=("/path/to/aime2024.jsonl",), prompt_field="question", template="chat")
    config.rl.rewards = rewards(paths["helpful"], paths["harmless"])
    config.rl.stop_strings = ()
    return config
