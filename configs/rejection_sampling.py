"""Rejection sampling (docs/reference.md §4 step 4): sample k responses per prompt from the reasoning-RL checkpoint,
keep the correct (rule checks, or a judge for prompts without a rule) and readable ones (no mixed languages, long
paragraphs or code blocks in the reasoning), pick per prompt, and mix in non-reasoning SFT data -> one SFT JSONL.

    python -m r1jax.main --config configs/rejection_sampling.py:tiny --workdir /tmp/rs --config.init_from=RL_RUN
    python -m r1jax.main --config configs/rejection_sampling.py --workdir gs://BUCKET/rs --config.init_from=RL_DIR \
        --config.data.prompt_files=/path/to/reasoning_prompts.jsonl \
        --config.data.non_reasoning_files=/path/to/non_reasoning_sft.jsonl
    python -m r1jax.main --config configs/rejection_sampling.py:hf --workdir W --config.init_from=DIR \
        --config.data.prompt_files=F --config.data.non_reasoning_files=F2

tiny: the tiny world's rl_train and code_train prompts (the cold-start template: raw question, readable output),
8 samples each at temperature 0.7, up to 2 kept per prompt, and its non_reasoning set at 25% of the mix (R1: ~600k
reasoning + ~200k non-reasoning).
Default: the V3-sized RL checkpoint; prompts whose answers rules cannot check go to DeepSeek-V3 as a generative
judge (judge.kind = generative, judge.checkpoint = its directory). k, the readability thresholds and the judge
prompt are not published: *unverified* choices.
hf: a Hugging Face checkpoint (e.g. an RL run exported with `python -m r1jax.hf`) on one TPU host, prompts in its
own chat template, R1's sampling settings (temperature 0.6, top-p 0.95, 32768 new tokens), k=16, rule checks only
(no judge: set judge.kind and judge.checkpoint to add one), the default preset's readability and selection.
"""

import ml_collections as mlc
from ml_collections.config_dict import placeholder

from configs import common, mesh_presets
from configs.eval import sampling_block
from r1jax.rl.judge import DEFAULT_PROMPT


def data_block(*, prompt_files: tuple = (), non_reasoning_files: tuple = (), prompt_field: str = "question",
               template: str = "chat", stop_strings: tuple = (), max_prompts_per_file: int = 0,
               tiny_world: bool = False, world_files: tuple = ("rl_train", "code_train"),
               non_reasoning_world_files: tuple = ("non_reasoning",), world_seed: int = 0) -> mlc.ConfigDict:
    """config.data: prompt files (prompt_field + `answer` or `tests` or neither) and non-reasoning SFT files
    (prompt, response); template renders prompt_field for the policy ("" = verbatim); a completion ends at EOS or
    one of stop_strings."""
    return mlc.ConfigDict(dict(
        prompt_files=tuple(prompt_files), non_reasoning_files=tuple(non_reasoning_files), prompt_field=prompt_field,
        template=template, stop_strings=tuple(stop_strings), max_prompts_per_file=max_prompts_per_file,
        tiny_world=tiny_world, world_files=tuple(world_files),
        non_reasoning_world_files=tuple(non_reasoning_world_files), world_seed=world_seed))


def judge_block(*, kind: str = "", checkpoint: str | None = None, aspect: str = "", min_score: float = 0.0,
                prompt_template: str = DEFAULT_PROMPT, yes: str = " yes", no: str = " no") -> mlc.ConfigDict:
    """config.judge for prompts without `answer` / `tests`: kind "" (none), reward_model (a reward_model run;
    aspect "" = its own) or generative (any LM: log p(yes) - log p(no) after prompt_template). A response is kept
    when its score >= min_score: 0 is the generative judge's even odds, while a reward model's score has no fixed
    zero (Bradley-Terry fixes only differences, and it includes the RM's likelihood term), so set min_score from
    its scores on responses known to be good."""
    return mlc.ConfigDict(dict(kind=kind, checkpoint=checkpoint if checkpoint is not None else placeholder(str),
                               aspect=aspect, min_score=min_score, prompt_template=prompt_template, yes=yes, no=no))


def rs_config(*, data, sampling, judge=None, max_paragraph_chars: int, min_language_share: float = 0.95,
              reject_code_blocks: bool = True, per_prompt: int = 1, pick: str = "shortest",
              non_reasoning_share: float = 0.25, chunk_prompts: int = 512, init_from: str | None = None,
              mesh_block=None, seed: int = 0) -> mlc.ConfigDict:
    """A complete config for the `rejection_sampling` stage."""
    return mlc.ConfigDict(dict(
        stage="rejection_sampling", seed=seed, mesh=mesh_block if mesh_block is not None else common.mesh(),
        init_from=init_from if init_from is not None else placeholder(str), data=data, sampling=sampling,
        judge=judge if judge is not None else judge_block(),
        readability=dict(max_paragraph_chars=max_paragraph_chars, min_language_share=min_language_share,
                         reject_code_blocks=reject_code_blocks),
        select=dict(per_prompt=per_prompt, pick=pick), mix=dict(non_reasoning_share=non_reasoning_share),
        output=dict(chunk_prompts=chunk_prompts), smoke_model=common.tiny_model("tiny_moe")))


def get_config(arg=None):
    if arg == "tiny":
        return rs_config(
            data=data_block(template="raw", tiny_world=True),
            sampling=sampling_block(samples=8, max_new_tokens=96, batch_prompts=32, prompt_buckets=(64, 128),
                                    method="temperature", temperature=0.7, top_p=1.0),
            max_paragraph_chars=400, per_prompt=2, pick="shortest", chunk_prompts=256)
    if arg == "hf":  # R1's sampling settings (docs/reference.md §4); selection as the default preset's
        return rs_config(
            data=data_block(prompt_files=("/path/to/reasoning_prompts.jsonl",),
                            non_reasoning_files=("/path/to/non_reasoning_sft.jsonl",), prompt_field="problem",
                            template=common.CHECKPOINT_TEMPLATE),
            sampling=sampling_block(samples=16, max_new_tokens=32768, batch_prompts=4,
                                    prompt_buckets=(512, 1024, 2048), method="top_p", temperature=0.6, top_p=0.95),
            max_paragraph_chars=2000, per_prompt=4, pick="random", init_from=common.HF_CHECKPOINT,
            chunk_prompts=512)
    if arg not in (None, ""):
        raise ValueError(f"configs/rejection_sampling.py: unknown preset {arg!r}; expected '', 'tiny' or 'hf'")
    return rs_config(
        data=data_block(prompt_files=("/path/to/reasoning_prompts.jsonl",),
                        non_reasoning_files=("/path/to/non_reasoning_sft.jsonl",)),
        sampling=sampling_block(samples=16, max_new_tokens=32768, batch_prompts=8,
                                prompt_buckets=(512, 1024, 2048), method="top_p", temperature=0.6, top_p=0.95),
        judge=judge_block(kind="generative", checkpoint="/path/to/DeepSeek-V3"),
        max_paragraph_chars=2000, per_prompt=4, pick="random",  # *unverified*
        mesh_block=mesh_presets.get(mesh_presets.V5P_671B), chunk_prompts=4096)
