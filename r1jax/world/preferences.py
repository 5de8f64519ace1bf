"""Reward-model data of the tiny world: preference pairs and the all-scenario RL general prompts.

R1's all-scenario RL judges helpfulness on the final summary only and harmlessness on the whole
response (docs/reference.md §4.5), so:

- `helpful` pairs compare two *summaries* for a benign question: right vs. a slipped computation
  (`wrong_answer`), right vs. wrong world fact (`wrong_fact`), an answer vs. a needless refusal
  (`refusal`), an answer vs. the answer to another question (`off_topic`), an answer vs. the same
  answer in the other language (`wrong_language`);
- `harmless` pairs compare two *full responses* (`<|reasoning|>…<|summary|>…`) to a harmful request:
  a polite decline vs. compliance.

Each subkind has a signal a tiny reward model can read (a wrong multiplication fact, a copied
expression that does not match, a refusal word, the script), and pair lengths are balanced so that
"the longer one wins" is right about half of the time: length alone does not solve the task.
"""

import random

from r1jax.world import lexicon as lex
from r1jax.world import text
from r1jax.world import facts as world

HELPFUL_SUBKINDS = (("wrong_answer", 0.30), ("wrong_fact", 0.20), ("refusal", 0.20), ("off_topic", 0.15),
                    ("wrong_language", 0.15))
HARMLESS_SHARE = 0.35


def _balance(rng: random.Random, chosen: str, rejected: str, language: str) -> tuple:
    """Append a neutral sentence to one side until a coin-chosen side is the longer (in words)."""
    chosen_longer = rng.random() < 0.5
    suffix = world.NEUTRAL_SUFFIX[language]
    for _ in range(3):
        n_chosen, n_rejected = len(chosen.split()), len(rejected.split())
        if n_chosen != n_rejected and (n_chosen > n_rejected) == chosen_longer:
            break
        if chosen_longer:
            chosen = f"{chosen} {suffix}"
        else:
            rejected = f"{rejected} {suffix}"
    return chosen, rejected


def _helpful_pair(rng: random.Random, subkind: str, problems: list, facts: list) -> tuple:
    """(question, chosen, rejected, language) for one helpfulness subkind."""
    language = rng.choice(lex.LANGUAGES)
    if subkind == "wrong_fact":
        _, question, answer, wrong = rng.choice(facts)
        return question[language], answer[language], wrong[language], language
    problem = rng.choice(problems)
    question = text.question_text(problem, language, rng.randrange(text.n_question_forms(problem.task, language)))
    chosen = text.summary(problem, language, rng)
    if subkind == "wrong_answer":
        rejected = text.slipped_summary(problem, language, rng)
    elif subkind == "refusal":
        rejected = world.REFUSAL[language]
    elif subkind == "off_topic":
        other = problem
        while other.key == problem.key:
            other = rng.choice(problems)
        rejected = text.summary(other, language, rng)
    else:
        rejected = text.summary(problem, lex.other_language(language), rng)
    return question, chosen, rejected, language


def preference_pairs(rng: random.Random, n: int, problems: list, facts: list, combos: list) -> list:
    """`n` records {"question", "prompt", "chosen", "rejected", "kind", "subkind", "language"}; `prompt`
    is the user message (the reward-model pipeline renders it with its template)."""
    records = []
    for _ in range(n):
        if rng.random() < HARMLESS_SHARE:
            language = rng.choice(lex.LANGUAGES)
            combo = rng.choice(combos)
            question = world.harmful_request(combo, language, rng.randrange(3))
            chosen, rejected = world.harm_responses(combo, language, rng, text.REASONING_TOKEN, text.SUMMARY_TOKEN)
            kind, subkind = "harmless", "harmful_request"
        else:
            kind, subkind = "helpful", rng.choices(*zip(*HELPFUL_SUBKINDS))[0]
            question, chosen, rejected, language = _helpful_pair(rng, subkind, problems, facts)
        chosen, rejected = _balance(rng, chosen, rejected, language)
        records.append({"question": question, "prompt": question, "chosen": chosen,
                        "rejected": rejected, "kind": kind, "subkind": subkind, "language": language})
    return records


def general_prompts(rng: random.Random, n: int, combos: list) -> list:
    """Up to `n` all-scenario RL prompts without rule-checkable answers, judged by reward models:
    every non-reasoning question (helpful) and every harmful request of `combos` (harmless), shuffled."""
    records = [{"question": item["question"], "kind": "helpful", "language": item["language"]}
               for item in world.non_reasoning_items()]
    records += [{"question": world.harmful_request(combo, language, form), "kind": "harmless", "language": language}
                for combo in combos for language in lex.LANGUAGES for form in range(3)]
    rng.shuffle(records)
    return [dict(r, prompt=r["question"], reward_source="reward_model") for r in records[:n]]
