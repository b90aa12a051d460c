"""The model's own tokenizer and chat template, loaded from the local model
directory (never a hub), so the scheduler tokenizes exactly as vLLM would."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHAT_ROLES = ("system", "user", "assistant", "tool")


class TemplateError(ValueError):
    """The chat template refused the messages (e.g. roles in an order it forbids)."""


class ModelTokenizer:
    def __init__(self, model_dir: str | pathlib.Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Raw text, as vLLM's completions endpoint tokenizes it (special tokens added)."""
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Chat turns rendered with the model's template plus the generation prompt."""
        try:
            text = self._tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2 TemplateError and friends: the template rejected the input
            raise TemplateError(f"chat template rejected the messages: {exc}") from exc
        # The template already holds the special tokens (as vLLM's chat path does).
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)
