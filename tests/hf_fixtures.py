"""Small random Hugging Face checkpoints of the two student families, as `transformers` saves them.

    qwen2_checkpoint(dir)   Qwen2ForCausalLM, byte-level BPE tokenizer trained by `tokenizers`, the Qwen2.5-Instruct
                            ChatML template inside tokenizer_config.json, EOS <|im_end|> + <|endoftext|> in
                            generation_config.json, no BOS, PAD <|endoftext|>.
    llama3_checkpoint(dir)  LlamaForCausalLM (llama3 RoPE), the Llama-3-Instruct header-token template in
                            chat_template.jinja (the newer file layout), BOS <|begin_of_text|>, tokenizer EOS
                            <|eot_id|>, and TWO EOS ids in generation_config.json (<|end_of_text|>, <|eot_id|>).

Both are written by save_pretrained (model, tokenizer and generation config), with every weight re-drawn (norms
and biases too) so no transposition hides behind a 1 or a 0. The `hf_checkpoints` fixture builds each once per
test session (a module-level cache shared by every test module that imports it): ~1 s each.

Data sets in the shapes and field names of the real ones, with answers that are right (a + b):
    write_gsm8k(path, n)     JSONL like openai/gsm8k: {"question", "answer": "worked steps\n#### 72"}
    write_math(path, n)      Parquet like hendrycks MATH: {"problem", "level", "type", "solution": "... \boxed{72}."}
                             (no answer column: the reference is inside the solution)
    write_messages(path, n)  JSONL of conversations like open-r1's SFT sets: {"messages": [{"role", "content"}, ...]}
Use them as `from hf_fixtures import hf_checkpoints, write_gsm8k` in a test module.
"""

from __future__ import annotations

import json
import os

import pytest

# Qwen2.5-Instruct's tokenizer_config.json `chat_template`, as released (JSON-decoded below).
QWEN25_TEMPLATE = json.loads(
    r'''"{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"'''
)

# Meta-Llama-3-Instruct's chat template, as released: BOS first, then header tokens around each role, contents trimmed.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rope_theta=10000.0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# Text the BPE merges are learnt from: math word problems, worked solutions and the R1 tags, so the tiny tokenizer
# splits real prompts into multi-byte pieces (and a tag such as `</answer>` into several tokens).
CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "Let $x$ be a real number such that $x^2 = 4$. Then $x = \\pm 2$, so the answer is $\\boxed{2}$.",
    "<think> The sum of 3 and 4 is 7. </think> <answer> 7 </answer>",
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.",
    "You are a helpful assistant. Please reason step by step, and put your final answer within \\boxed{}.",
] * 4


# The released tokenizer.json pre-tokenizers: a Split on these regexes, then ByteLevel without its own regex
# (transformers 5 rebuilds Qwen2Tokenizer's from its class, so the fixture must match the release to agree with it).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _tokenizer(specials: list[str], split: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def randomise(model):
    """Seeded weights large enough that a mapping error shows in the logits: norms near 1, everything else N(0, 0.1),
    DeepSeek-V3's selection bias small and positive (it changes which experts win)."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.rand_like(b))
    return model.eval()


def qwen2_checkpoint(path: str) -> str:
    """A Qwen2.5-Instruct-shaped checkpoint at `path` (see the module docstring); returns `path`."""
    import transformers

    tok = _tokenizer(QWEN_SPECIALS, QWEN2_SPLIT)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                unk_token=None, bos_token=None)
    fast.save_pretrained(path)
    _config_holds_template(path, QWEN25_TEMPLATE)  # the released Qwen2.5 files keep the template here
    eos, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    config = transformers.Qwen2Config(**TINY, vocab_size=tok.get_vocab_size(), tie_word_embeddings=True,
                                      bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    model = randomise(transformers.Qwen2ForCausalLM(config))
    model.generation_config = transformers.GenerationConfig(bos_token_id=pad, pad_token_id=pad,
                                                            eos_token_id=[eos, pad])
    model.save_pretrained(path)
    return path


def llama3_checkpoint(path: str) -> str:
    """A Llama-3-Instruct-shaped checkpoint at `path` (see the module docstring); returns `path`."""
    import transformers

    tok = _tokenizer(LLAMA_SPECIALS, LLAMA3_SPLIT)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(path)
    if not os.path.exists(os.path.join(path, "chat_template.jinja")):  # older transformers kept it in the config
        _config_holds_template(path, None)
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(LLAMA3_TEMPLATE)
    bos, end, eot = (tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
    config = transformers.LlamaConfig(**TINY, head_dim=8, rope_scaling=LLAMA3_ROPE, vocab_size=tok.get_vocab_size(),
                                      bos_token_id=bos, eos_token_id=[end, eot])
    model = randomise(transformers.LlamaForCausalLM(config))
    model.generation_config = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=[end, eot])
    model.save_pretrained(path)
    return path


def _config_holds_template(path: str, template: str | None) -> None:
    """Put `template` into tokenizer_config.json (None: remove it) and drop any chat_template.jinja."""
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)


BUILDERS = {"qwen2": qwen2_checkpoint, "llama3": llama3_checkpoint}
_CACHE: dict[str, str] = {}


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """hf_checkpoints(family) -> directory of that family's checkpoint ("qwen2" or "llama3"), built once per session.
    Treat the directories as read-only (copy one to edit it)."""
    pytest.importorskip("transformers")

    def get(family: str) -> str:
        if family not in _CACHE:
            _CACHE[family] = BUILDERS[family](str(tmp_path_factory.mktemp(f"hf_{family}")))
        return _CACHE[family]

    return get


# ------------------------------------------------------------------------------------------------ data sets

def _sums(n: int, seed: int):
    import random

    rnd = random.Random(seed)
    return [(rnd.randint(10, 99), rnd.randint(10, 99)) for _ in range(n)]


def write_gsm8k(path: str, n: int = 8, seed: int = 0) -> str:
    """A GSM8K-shaped JSONL file (see the module docstring); returns `path`."""
    with open(path, "w") as f:
        for a, b in _sums(n, seed):
            answer = (f"Natalia sold {a} clips in April and {b} in May.\n"
                      f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}")
            f.write(json.dumps({"question": f"Natalia sold {a} clips in April and {b} clips in May. How many clips "
                                            "did she sell altogether?", "answer": answer}) + "\n")
    return path


def write_math(path: str, n: int = 8, seed: int = 1) -> str:
    """A MATH-shaped Parquet file (see the module docstring); returns `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": f"Compute ${a} + {b}$.", "level": "Level 1", "type": "Prealgebra",
             "solution": f"Adding the tens and the ones, ${a} + {b} = {a + b}$, so the sum is $\\boxed{{{a + b}}}$."}
            for a, b in _sums(n, seed)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_messages(path: str, n: int = 8, seed: int = 2) -> str:
    """A JSONL file of conversations (system + user + assistant, every third with a second exchange); returns
    `path`."""
    with open(path, "w") as f:
        for i, (a, b) in enumerate(_sums(n, seed)):
            messages = [{"role": "system", "content": "Please reason step by step."},
                        {"role": "user", "content": f"What is {a} + {b}?"},
                        {"role": "assistant", "content": f"<think> {a} + {b} = {a + b} </think> <answer> {a + b} "
                                                         "</answer>"}]
            if i % 3 == 0:
                messages += [{"role": "user", "content": "And doubled?"},
                             {"role": "assistant", "content": f"<think> 2 * {a + b} </think> <answer> {2 * (a + b)} "
                                                              "</answer>"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
