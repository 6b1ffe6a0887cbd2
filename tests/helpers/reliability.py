"""Helpers for the reliability tests: the world of tiny artifacts (bases, adapters, an export, a
training recipe) and running the real command line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import hypermerge as hm
from tests.helpers.common import load_tiny, perturb_adapter, save_tiny, subprocess_env, tiny_config
from tests.helpers.training import save_tiny_base, sentiment_rows, tiny_recipe, write_jsonl


@dataclass
class World:
    root: Path
    llama: Path  # tiny Llama base (safetensors, no tokenizer)
    wider: Path  # a Llama with another intermediate size (same names, other shapes)
    gpt2: Path  # another architecture (other names)
    lora: Path  # LoRA adapter for llama
    gpt2_lora: Path  # LoRA adapter for gpt2
    onnx: Path  # llama exported (no parity check)
    bert: Path  # tiny Bert classifier with a character tokenizer (for training)
    data: Path  # a tiny .jsonl sentiment set
    recipe: dict  # a recipe (plain dict) that trains bert for two steps


def _adapter(arch: str, base: Path, out: Path) -> Path:
    model = hm.inject(load_tiny(arch, base), hm.LoRAConfig(r=4, alpha=8))
    perturb_adapter(model)
    hm.save_adapter(model, out, base_model=base)
    return out


def build_world(root: Path) -> World:
    """Save the tiny artifacts under ``root``."""
    import transformers

    llama = save_tiny("llama", root / "llama")
    config = tiny_config("llama")
    config.intermediate_size = 48
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "wider")
    gpt2 = save_tiny("gpt2", root / "gpt2")
    hm.export_model(llama, root / "onnx", verify=False, progress=False)
    bert = save_tiny_base("bert", root / "bert")
    data = write_jsonl(root / "train.jsonl", sentiment_rows(16, 0))
    recipe = tiny_recipe({"bert": bert, "cls_train": data}, max_steps=2, save_steps=None, eval_steps=None)
    recipe["data"]["validation"] = None
    return World(root=root, llama=llama, wider=root / "wider", gpt2=gpt2, lora=_adapter("llama", llama, root / "lora"),
                 gpt2_lora=_adapter("gpt2", gpt2, root / "gpt2-lora"), onnx=root / "onnx", bert=bert, data=data,
                 recipe=recipe)


def run_cli(*args: str, env: dict | None = None, ulimit_f: int | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m hypermerge ARGS`` in a real process (optionally under ``ulimit -f`` blocks of 1 KiB)."""
    command = [sys.executable, "-m", "hypermerge", *map(str, args)]
    if ulimit_f is not None:
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing it.
        command = ["bash", "-c", f'ulimit -f {ulimit_f}; exec "$@"', "bash", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(OMP_NUM_THREADS="1", **(env or {})))


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``path`` (the state a failed run must not change)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def copy_tree(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.is_file():
            (target / entry.name).write_bytes(entry.read_bytes())
    return target


def edit_json(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def temporaries(parent: Path) -> list[str]:
    """Temporary siblings (atomic outputs, partial downloads) left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if "hm-tmp" in p.name or ".tmp" in p.name) if parent.is_dir() else []

