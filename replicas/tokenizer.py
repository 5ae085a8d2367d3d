"""The model's tokenizer, loaded the same way by engines and by the API ingress."""

from __future__ import annotations

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


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation rendered with the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("this model has no chat template; use completions instead")
    rendered = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return list(rendered)
