"""The model's tokenizer, loaded the same way by engines and by the API ingress."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from replicas.config import EngineConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TokenizerError(ValueError):
    """The tokenizer cannot do what a request asks (e.g. no chat template)."""


def load_tokenizer(config: EngineConfig, source: str) -> PreTrainedTokenizerBase:
    """`source` is the resolved model directory or hub id (see `resolve_model_source`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        config.tokenizer or source,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
    )
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TokenizerError(f"{source}: a fast (tokenizers) tokenizer is required")
    return tokenizer


# Templates that know nothing of tools get them the Hermes way (the default tool parser's format).
TOOLS_PROMPT = (
    "You can call functions. Their signatures are within <tools></tools>:\n<tools>\n{}\n"
    "</tools>\nTo call one, answer with a JSON object within <tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the model's chat template renders a tool list (transformers' `tools`)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    templates = template.values() if isinstance(template, dict) else [template]
    return any("tools" in t for t in templates)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> str:
    """A conversation rendered with the model's own chat template, as text (the template adds
    its own special tokens: encode it with `add_special_tokens=False`).

    `tools` (OpenAI's `[{"type": "function", "function": {...}}]`), assistant `tool_calls` and
    `tool` results go through the template where it supports tools; otherwise they are written
    into the conversation as text in the Hermes format.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("this model has no chat template; use completions instead")
    if not supports_tools(tokenizer):
        messages, tools = tools_as_text(messages, tools), None
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **template_kwargs,
    )


def max_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the UTF-8 bytes of any one token's text: the longest vocabulary entry
    (byte-level BPE spells each byte as one or two bytes of its entry; SentencePiece pieces and
    byte fallbacks like <0xE3> are at least as long as what they decode to). A text of B bytes
    therefore has at least B / max_token_bytes tokens, known without tokenizing it."""
    return max(len(token.encode()) for token in tokenizer.get_vocab())


def tools_as_text(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation with tools, calls and results written as Hermes-format text."""
    out = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if calls:
            text = "\n".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                )
                + "\n</tool_call>"
                for c in calls
            )
            message["content"] = f"{message.get('content') or ''}{text}"
        if message["role"] == "tool":
            content = message.get("content") or ""
            message = {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
        out.append(message)
    if tools:
        prompt = TOOLS_PROMPT.format("\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
