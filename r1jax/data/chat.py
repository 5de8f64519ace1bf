"""Conversations rendered with a checkpoint's own chat template, exactly as `transformers` renders them.

    render_chat(tokenizer, messages, add_generation_prompt=True, system=None) -> str
    render(template, tokenizer, conversation, system=None) -> str   prompt text for a config's `data.template`
    encode_prompt(tokenizer, text) -> ids                            BOS added only when the text lacks it
    encode_chat_sft(tokenizer, messages, system=None, max_len=None) -> {"tokens", "loss_mask"}

The template is Jinja run the way `transformers.apply_chat_template` runs it (transformers 4.4x-5.x,
utils/chat_template_utils.py): an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks and the
loopcontrols extension; globals `raise_exception` (a TemplateError), `strftime_now` (the current local time),
`namespace` (Jinja's); a `tojson` filter that does not escape HTML (json.dumps with ensure_ascii=False); the tokenizer's
special tokens as variables (`bos_token`, `eos_token`, ...); `messages`, `add_generation_prompt`, `tools` and
`documents` (None). A template is untrusted code from the Hub: the sandbox is what keeps it from reaching Python.

Template names (a config's `data.template`): "checkpoint" renders with the tokenizer's chat template (an error
when the checkpoint has none: a base model such as Qwen2.5-Math-1.5B ships without one and takes "r1_zero");
every other name is a plain template of r1jax.data.templates ("r1_zero", "chat", "raw").

SFT on conversations: the loss mask is 1 on exactly what the template writes for each assistant turn after its
generation prompt, end-of-turn tokens included (`<think>..</think> answer<|im_end|>\n` in ChatML): the text
between `render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])`. Each piece of text is
encoded on its own, the way a prompt and the model's own tokens meet at sampling time, so the mask is exact by
construction. Templates that re-render earlier turns differently once a later turn exists (DeepSeek-R1's drops the
reasoning of past assistant turns) have no such prefixes; that is a clear error naming the turn.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np

from r1jax.data import templates
from r1jax.data.tokenizer import Tokenizer

CHECKPOINT = "checkpoint"  # the template name meaning "the checkpoint's own chat template"
Messages = Sequence[Mapping[str, object]]
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A conversation cannot be rendered (no template, bad messages, a template that raised)."""


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The Jinja template `source`, compiled as transformers compiles chat templates (see the module docstring)."""
    import jinja2  # noqa: PLC0415
    import jinja2.ext  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & for HTML; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}..{% endgeneration %}` (TRL-style assistant markers) renders its body, as transformers
        does when it is not tracking assistant tokens."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template, line {e.lineno}: {e.message}") from None


def _checked(messages: Messages, system: str | None) -> list[dict]:
    """Plain dict copies of `messages` ({"role", "content"}, more keys passed through), with a system turn first
    when `system` is given and the conversation has none."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages: expected a list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"message {i}: field 'role': expected a str, got {m.get('role')!r:.80}")
        if not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i}: field 'content': expected a str, got {m.get('content')!r:.80}")
        m = {k: v for k, v in m.items() if v is not None}  # transformers drops None-valued keys
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        if reasoning is not None:  # transformers passes reasoning under each name templates read it by
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    if system is not None and not (out and out[0]["role"] == "system"):
        out.insert(0, {"role": "system", "content": system})
    return out


def render_chat(tokenizer: Tokenizer, messages: Messages, *, add_generation_prompt: bool = True,
                system: str | None = None, **variables) -> str:
    """`messages` rendered with the tokenizer's chat template; equals transformers'
    `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`. `system`: a system turn put first
    when the conversation has none (else the template's own default, if any, applies). `variables`: extra template
    variables (e.g. `enable_thinking=False`), as apply_chat_template's kwargs."""
    source = tokenizer.chat_template
    if source is None:
        raise ChatTemplateError(
            f"{getattr(tokenizer, 'path', 'the tokenizer')}: the checkpoint has no chat template (no chat_template in "
            "tokenizer_config.json, no chat_template.jinja): a base model; set data.template to 'r1_zero' (or 'raw')")
    import jinja2  # noqa: PLC0415

    context = {**tokenizer.special_tokens, **variables}
    try:
        return compile_template(source).render(messages=_checked(messages, system), tools=None, documents=None,
                                               add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"{getattr(tokenizer, 'path', 'chat template')}: the chat template refused the "
                                f"conversation: {e}") from None


def render(template: str, tokenizer: Tokenizer, conversation: str | Messages, system: str | None = None) -> str:
    """Prompt text ending where the assistant starts writing: with template "checkpoint", the tokenizer's chat
    template (a question becomes one user turn); else the plain template of that name (templates.render_prompt)."""
    if template != CHECKPOINT:
        if template not in templates.TEMPLATES:
            raise ValueError(f"template={template!r}: expected {CHECKPOINT!r} or one of {sorted(templates.TEMPLATES)}")
        return templates.render_prompt(template, conversation, system)
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    return render_chat(tokenizer, conversation, add_generation_prompt=True, system=system)


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt: BOS first when the tokenizer has one and the text does not already begin
    with it (a chat template such as Llama-3's writes `<|begin_of_text|>` itself; transformers then encodes with
    add_special_tokens=False, as here)."""
    ids = tokenizer.encode(text)
    if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    return ids


def assistant_spans(tokenizer: Tokenizer, messages: Messages, system: str | None = None) -> tuple[str, list]:
    """(the whole conversation rendered, [(start, end) character span of each assistant turn]); see the module
    docstring for what a span covers. Raises ChatTemplateError when the template does not render prefixes
    consistently."""
    messages = _checked(messages, system)
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (through.startswith(head) and full.startswith(through)):
            bad = "its generation prompt" if not through.startswith(head) else "the whole conversation"
            raise ChatTemplateError(
                f"{getattr(tokenizer, 'path', 'chat template')}: the chat template does not render prefixes "
                f"consistently at message {i} (assistant): the conversation up to it is not a prefix of {bad}, so "
                "the assistant tokens cannot be located (templates that rewrite past turns, e.g. drop their "
                "reasoning, do this); train on single-turn records or use a template without that rewrite")
        if spans and len(head) < spans[-1][1]:
            raise ChatTemplateError(f"message {i}: assistant turns overlap in the rendered text")
        spans.append((len(head), len(through)))
    if not spans:
        raise ChatTemplateError("messages: no assistant turn to train on")
    return full, spans


def encode_chat_sft(tokenizer: Tokenizer, messages: Messages, *, system: str | None = None,
                    max_len: int | None = None) -> dict[str, np.ndarray]:
    """Tokens of the rendered conversation and a loss mask that is 1 on exactly the assistant turns' tokens.

    The counterpart of templates.encode_sft_example for `messages` records: `loss_mask[i] = 1` means token i is a
    target. BOS comes from the template (or is added when it has none and the tokenizer has one); EOS is whatever
    the template ends an assistant turn with. Raises ValueError when longer than `max_len`.
    """
    full, spans = assistant_spans(tokenizer, messages, system)
    tokens: list[int] = []
    mask: list[int] = []
    cursor = 0
    for start, end in spans + [(len(full), len(full))]:
        for text, target in ((full[cursor:start], 0), (full[start:end], 1)):
            ids = tokenizer.encode(text) if text else []
            tokens += ids
            mask += [target] * len(ids)
        cursor = end
    if tokenizer.bos_id is not None and tokens[:1] != [tokenizer.bos_id]:
        tokens, mask = [tokenizer.bos_id] + tokens, [0] + mask
    if max_len is not None and len(tokens) > max_len:
        raise ValueError(f"expected at most {max_len} tokens, got {len(tokens)}")
    return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(mask, np.int32)}
