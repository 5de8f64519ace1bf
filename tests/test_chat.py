"""r1jax.data.chat against `transformers`: a checkpoint's own chat template renders exactly as
`apply_chat_template(..., tokenize=False)` for Qwen2.5's ChatML and Llama-3's header tokens, with and without a
system turn, with and without the generation prompt; SFT's loss mask covers exactly the assistant turns; templates
that rewrite past turns, raise, or are missing fail clearly."""

import json
import shutil

import numpy as np
import pytest

from hf_fixtures import hf_checkpoints, write_messages  # noqa: F401 (fixture)
from r1jax.data import chat
from r1jax.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

QUESTION = [{"role": "user", "content": "What is 3+4? Put the answer in \\boxed{}."}]
SYSTEM = [{"role": "system", "content": "Please reason step by step."}]
DIALOGUE = [
    {"role": "user", "content": "What is 3+4?"},
    {"role": "assistant", "content": "<think> 3 plus 4 is 7 </think> <answer> 7 </answer>"},
    {"role": "user", "content": "And 48 / 2?"},
    {"role": "assistant", "content": "<think> half of 48 </think> <answer> 24 </answer>"},
]
FAMILIES = ("qwen2", "llama3")


@pytest.fixture(scope="module")
def toks(hf_checkpoints):  # noqa: F811
    """family -> (r1jax tokenizer, transformers tokenizer) of the same checkpoint."""
    return {f: (load_tokenizer(hf_checkpoints(f)), transformers.AutoTokenizer.from_pretrained(hf_checkpoints(f)))
            for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_rendering_equals_transformers(toks, family):
    ours, theirs = toks[family]
    for messages in (QUESTION, SYSTEM + QUESTION, DIALOGUE, SYSTEM + DIALOGUE):
        for generation_prompt in (True, False):
            want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert chat.render_chat(ours, messages, add_generation_prompt=generation_prompt) == want
    # a system turn from the config goes first when the data has none, and the data's own wins
    want = theirs.apply_chat_template(SYSTEM + QUESTION, tokenize=False, add_generation_prompt=True)
    assert chat.render(chat.CHECKPOINT, ours, QUESTION[0]["content"], system=SYSTEM[0]["content"]) == want
    assert chat.render_chat(ours, SYSTEM + QUESTION, system="ignored") == want
    # the plain templates stay available for base models
    assert chat.render("r1_zero", ours, "What is 3+4?").endswith("User: What is 3+4?\nAssistant:")


def test_template_specific_behaviour(toks):
    qwen, llama = toks["qwen2"][0], toks["llama3"][0]
    # Qwen2.5 adds its own default system turn; Llama-3 writes BOS itself and trims contents
    assert chat.render_chat(qwen, QUESTION).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert chat.render_chat(llama, [{"role": "user", "content": "  hi \n"}]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    text = chat.render_chat(llama, QUESTION)
    ids = chat.encode_prompt(llama, text)
    assert ids[0] == llama.bos_id and ids[1] != llama.bos_id  # no second BOS
    plain = chat.encode_prompt(llama, "User: hi\nAssistant:")
    assert plain[0] == llama.bos_id and chat.encode_prompt(qwen, "hi") == qwen.encode("hi")  # Qwen has no BOS


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_mask_covers_exactly_the_assistant_turns(toks, family):
    ours, theirs = toks[family]
    out = chat.encode_chat_sft(ours, SYSTEM + DIALOGUE)
    tokens, mask = out["tokens"], out["loss_mask"]
    assert tokens.shape == mask.shape and set(np.unique(mask)) == {0, 1}
    full = theirs.apply_chat_template(SYSTEM + DIALOGUE, tokenize=False)
    raw = ours._tok.decode([int(t) for t in tokens], skip_special_tokens=False)  # noqa: SLF001 - specials kept
    assert raw == full
    # each run of mask=1 decodes to one assistant turn as rendered: its content and the end-of-turn token
    starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate([mask, [0]])) == -1) + 1
    runs = [ours._tok.decode([int(t) for t in tokens[a:b]], skip_special_tokens=False)  # noqa: SLF001
            for a, b in zip(starts, ends)]
    end = {"qwen2": "<|im_end|>\n", "llama3": "<|eot_id|>"}[family]
    assert runs == [m["content"] + end for m in DIALOGUE if m["role"] == "assistant"]
    # every token before the first assistant turn and between turns is context, never a target
    prompt_len = len(chat.encode_prompt(ours, theirs.apply_chat_template(
        SYSTEM + DIALOGUE[:1], tokenize=False, add_generation_prompt=True)))
    assert starts[0] == prompt_len and not mask[:prompt_len].any()
    assert int(tokens[ends[-1] - (2 if family == "qwen2" else 1)]) in ours.eos_ids  # the turn ends in an EOS id
    with pytest.raises(ValueError, match="expected at most 10 tokens"):
        chat.encode_chat_sft(ours, DIALOGUE, max_len=10)


def test_sft_on_a_messages_file(toks, tmp_path):
    from r1jax.data.sources import iterate_records

    records = list(iterate_records([write_messages(str(tmp_path / "sft.jsonl"))]))
    for family in FAMILIES:
        ours, theirs = toks[family]
        for record in records:
            out = chat.encode_chat_sft(ours, record["messages"])
            mask = out["loss_mask"]
            turns = [m for m in record["messages"] if m["role"] == "assistant"]
            assert int((np.diff(np.concatenate([[0], mask])) == 1).sum()) == len(turns)
            assert ours.decode(out["tokens"][mask == 1]) == "".join(
                m["content"] + ("\n" if family == "qwen2" else "") for m in turns)  # EOS ids decode to nothing
            assert ours._tok.decode([int(t) for t in out["tokens"]], skip_special_tokens=False) == \
                theirs.apply_chat_template(record["messages"], tokenize=False)  # noqa: SLF001


def _with_template(src, dst, template):
    shutil.copytree(src, dst)
    with open(dst / "tokenizer_config.json") as f:
        config = json.load(f)
    config["chat_template"] = template
    with open(dst / "tokenizer_config.json", "w") as f:
        json.dump(config, f)
    return load_tokenizer(str(dst))


def test_templates_that_cannot_be_masked_or_refuse_fail_clearly(hf_checkpoints, tmp_path):  # noqa: F811
    # DeepSeek-R1's rule, in short: past assistant turns lose their reasoning, so prefixes are not consistent
    drops_reasoning = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set c = m['content'] %}"
        "{% if not loop.last and '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
        "<|im_start|>assistant\n{{ c }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = _with_template(hf_checkpoints("qwen2"), tmp_path / "r1", drops_reasoning)
    with pytest.raises(chat.ChatTemplateError, match="does not render prefixes consistently at message 1"):
        chat.encode_chat_sft(tok, DIALOGUE)
    assert chat.encode_chat_sft(tok, DIALOGUE[:2])["loss_mask"].any()  # single-turn records are fine
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}{{ m['content'] | tojson }}{{ strftime_now('%Y') }}{% endfor %}")
    tok = _with_template(hf_checkpoints("qwen2"), tmp_path / "strict", strict)
    with pytest.raises(chat.ChatTemplateError, match="refused the conversation: System role not supported"):
        chat.render_chat(tok, SYSTEM + QUESTION)
    text = chat.render_chat(tok, [{"role": "user", "content": "<b>é</b>"}])
    assert text.startswith('"<b>é</b>"') and text[-4:].isdigit()  # tojson neither escapes HTML nor non-ASCII
    with pytest.raises(chat.ChatTemplateError, match="no assistant turn"):
        chat.encode_chat_sft(tok, QUESTION)
    with pytest.raises(chat.ChatTemplateError, match="message 0: field 'content': expected a str"):
        chat.render_chat(tok, [{"role": "user", "content": ["x"]}])
    with pytest.raises(chat.ChatTemplateError, match="line 1"):
        chat.render_chat(_with_template(hf_checkpoints("qwen2"), tmp_path / "bad", "{% if %}"), QUESTION)
    # a base model has no template: the error says which template to use instead
    base = tmp_path / "base"
    shutil.copytree(hf_checkpoints("llama3"), base)
    (base / "chat_template.jinja").unlink()
    with pytest.raises(chat.ChatTemplateError, match="no chat template.*set data.template to 'r1_zero'"):
        chat.render(chat.CHECKPOINT, load_tokenizer(str(base)), "hi")
