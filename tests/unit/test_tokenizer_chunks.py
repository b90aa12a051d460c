"""Long prompts are encoded in pieces (services/tokenizer.py): the ids must be exactly the
whole text's, for any text — the pieces are cut only where the pre-tokenizer splits anyway."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from services import tokenizer as tokenizer_module
from services.model_fetch import default_model_dir
from services.tokenizer import ModelTokenizer, split_at_words

MODEL_DIR = default_model_dir()
pytestmark = pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(),
                                reason=f"no tokenizer at {MODEL_DIR}: run `llm-mesh model fetch` first")

# Words, runs of spaces, newlines, tabs, punctuation, digits, non-Latin scripts, emoji, the
# chat template's special tokens: every boundary the pre-tokenizer's regex distinguishes.
PIECES = st.sampled_from([" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "'s", "'re", "don't", "12345", "3.14",
                          "<|im_start|>", "<|im_end|>", "user", "assistant", "héllo", "naïve", "日本語",
                          "مرحبا", "🙂", "👩‍💻", "!!", "?", "—", "a", "the", "Paris", ".", ",", "x" * 40])


@pytest.fixture(scope="module")
def tok() -> ModelTokenizer:
    return ModelTokenizer(MODEL_DIR)


def whole(tok: ModelTokenizer, text: str, special: bool) -> list[int]:
    return list(tok._tok(text, add_special_tokens=special)["input_ids"])


def test_pieces_encode_exactly_as_the_whole_text(tok, monkeypatch):
    assert tok._prefix is not None, "SmolLM2's tokenizer is chunkable"

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(parts=st.lists(PIECES, min_size=1, max_size=200), size=st.integers(1, 64))
    def check(parts: list[str], size: int) -> None:
        text = "".join(parts)
        monkeypatch.setattr(tokenizer_module, "CHUNK_CHARS", size)  # tiny pieces: many boundaries
        assert "".join(split_at_words(text, size)) == text
        assert tok.encode(text) == whole(tok, text, True)
        assert tok._encode_plain(text) == whole(tok, text, False)

    check()


def test_a_long_chat_prompt_is_unchanged(tok):
    messages = [{"role": "system", "content": "You are terse. " * 2000},
                {"role": "user", "content": "Summarize:  " + "the river  runs\\n\\n past 日本 🙂 " * 3000}]
    text = tok._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert len(text) > 10 * tokenizer_module.CHUNK_CHARS
    assert tok.encode_chat(messages) == whole(tok, text, False)


def test_split_points_are_single_spaces_between_words():
    pieces = split_at_words("aaaa bbbb  cccc dddd", 3)
    assert pieces == ["aaaa", " bbbb  cccc", " dddd"]
    assert split_at_words("nospaceshere", 2) == ["nospaceshere"]
