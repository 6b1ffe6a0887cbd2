"""Reading and writing Hugging Face model directories: weight shards, their index, and the
files (config, tokenizer, generation config, pooling configs) that travel with them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from hypermerge._fs import require_dir
from hypermerge.errors import CheckpointError
from hypermerge.fold.safetensors_io import SafetensorsHeader, TensorEntry, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "tf_model.h5")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class BaseCheckpoint:
    """The weights of a HF model directory: shard files and which tensor lives where."""

    path: Path
    shards: list[Path]
    index: dict | None  # the parsed index file, None for a single-file checkpoint
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    shard_of: dict[str, Path]
    headers: dict[Path, SafetensorsHeader] = dataclasses.field(default_factory=dict)

    def entry(self, name: str) -> TensorEntry:
        """Where the bytes of tensor ``name`` are."""
        return self.headers[self.shard_of[name]].entries[name]


def open_base(path: str | Path) -> BaseCheckpoint:
    """Find and check the safetensors weights of a model directory (headers only, no tensor data).

    Raises:
        CheckpointError: no safetensors weights (pickle ones are refused), a missing, truncated or
            damaged shard, a damaged index, or an index that disagrees with its shards.
    """
    path = require_dir(path, "base model directory")
    index_path = path / INDEX_FILE
    index = None
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map = dict(index["weight_map"])
            shard_names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{INDEX_FILE} is damaged ({exc})", path=index_path,
                                  hint="re-save the model with save_pretrained") from exc
        shards = [path / name for name in shard_names]
        for shard in shards:
            if not shard.exists():
                raise CheckpointError("a weight shard listed in the index is missing", path=shard,
                                      hint="the download or copy is incomplete; copy the model again")
    elif (path / SINGLE_FILE).exists():
        shards = [path / SINGLE_FILE]
        weight_map = None
    else:
        pickled = [name for name in PICKLE_WEIGHTS if (path / name).exists()]
        if pickled:
            raise CheckpointError(f"the model has only pickle weights ({pickled[0]}), which hypermerge refuses "
                                  "to load (unpickling runs arbitrary code)", path=path / pickled[0],
                                  hint="re-save it with save_pretrained(safe_serialization=True)")
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE}", path=path,
                              hint="pass a Hugging Face model directory with safetensors weights")
    shapes, dtypes, shard_of, headers = {}, {}, {}, {}
    for shard in shards:
        header = read_header(shard)
        headers[shard] = header
        for name, entry in header.entries.items():
            if name in shard_of:
                raise CheckpointError(f"{name} is stored twice ({shard_of[name].name} and {shard.name})",
                                      path=shard, hint="re-save the model with save_pretrained")
            shapes[name] = entry.shape
            dtypes[name] = entry.dtype
            shard_of[name] = shard
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if name not in shard_of or shard_of[name].name != shard_name:
                raise CheckpointError(f"the index puts {name} in {shard_name}, but that shard does not hold it",
                                      path=index_path, hint="the index and the shards disagree; re-save the model")
    return BaseCheckpoint(path, shards, index, shapes, dtypes, shard_of, headers)


def is_weight_file(path: Path) -> bool:
    name = path.name
    return (name.endswith(".safetensors") or name == INDEX_FILE or name in PICKLE_WEIGHTS
            or name.endswith(".bin") or name.endswith(".gguf"))


def copy_model_files(source: Path, destination: Path) -> list[str]:
    """Copy everything but weights (config, tokenizer, generation and pooling configs, READMEs).

    Returns:
        The names copied.
    """
    copied = []
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(".") or "hm-tmp" in entry.name:
            continue
        if entry.is_dir():
            if any(is_weight_file(p) for p in entry.rglob("*")):
                continue
            shutil.copytree(entry, destination / entry.name)
            copied.append(entry.name + "/")
        elif not is_weight_file(entry):
            shutil.copy2(entry, destination / entry.name)
            copied.append(entry.name)
    return copied


def update_config(path: Path, updates: dict) -> None:
    """Merge ``updates`` into the config.json at ``path`` (if there is one)."""
    config_path = path / "config.json"
    if not config_path.exists() or not updates:
        return
    config = json.loads(config_path.read_text())
    config.update(updates)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
