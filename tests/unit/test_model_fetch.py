"""The fetched model directory loads with transformers and answers sensibly.

These check the output of `llm-mesh model fetch` (run it first); they skip when
the directory is missing rather than downloading 92 MB inside a unit test.
"""

from __future__ import annotations

import argparse
import os

import pytest

from services import model_fetch

MODEL_DIR = model_fetch.default_model_dir()
needs_model = pytest.mark.skipif(
    not model_fetch.is_complete(MODEL_DIR),
    reason=f"model not fetched: run `llm-mesh model fetch` (expected a complete copy at {MODEL_DIR})",
)


def test_default_dir_follows_llm_mesh_home(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LLM_MESH_HOME", str(tmp_path))
    assert model_fetch.default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"


def test_existing_complete_dir_is_not_rebuilt(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / model_fetch.MARKER_FILE).write_text("{}")
    assert model_fetch.ensure_model(dest) == dest
    parser = argparse.ArgumentParser()
    model_fetch.add_arguments(parser)
    assert model_fetch.run(parser.parse_args(["--dest", str(dest)])) == 0
    assert "already present" in capsys.readouterr().err


@needs_model
def test_config_is_plain_llama() -> None:
    import json

    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (MODEL_DIR / "model.safetensors").stat().st_size > 200_000_000


@needs_model
def test_tokenizer_renders_chat_template() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"


@needs_model
def test_greedy_answer_names_paris() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
