"""The adapter checkpoint on disk: its file names, the :class:`AdapterCheckpoint` record, and reading
its weights (safetensors only, never a pickle).

Both readers share this: :func:`hypermerge.adapters.checkpoint.read_adapter` (the hypermerge
format) and :func:`hypermerge.adapters.peft_import.read_peft_adapter` (PEFT's).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import hypermerge.adapters.base_digest as digests
from hypermerge.adapters.base import AdapterConfig, AdapterMethod
from hypermerge.adapters.validation import FULL_SUFFIX
from hypermerge.errors import CheckpointError

FORMAT = "hypermerge-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")


@dataclasses.dataclass
class AdapterCheckpoint:
    """An adapter checkpoint read from disk; tensors are loaded on first use."""

    path: Path
    method: type[AdapterMethod]
    config: AdapterConfig
    base_model: str | None
    base_fingerprint: dict[str, tuple[tuple[int, ...], str]]
    targets: list[str]
    fan_in_fan_out: set[str]
    metadata: dict[str, Any]
    # the tensors once read; a reader that already holds them passes them in (PEFT's, renamed)
    loaded: dict[str, torch.Tensor] | None = None
    base_digest: digests.BaseDigest | None = None  # None: PEFT, or saved before digests existed

    def content_sha256(self) -> str:
        """sha256 of the adapter's files (config and weights): what a certificate records."""
        digest = hashlib.sha256()
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            file = self.path / name
            if file.is_file():
                digest.update(name.encode())
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
        return digest.hexdigest()

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.loaded is None:
            self.loaded = read_safetensors(self.weights_path, what="adapter weights")
        return self.loaded

    def layer_params(self, weight_name: str) -> dict[str, torch.Tensor]:
        """The tensors of one adapted weight, keyed by short name (``"a"``, ``"lora_A"``)."""
        prefix = f"{weight_name}::{self.method.name}."
        return {k[len(prefix):]: v for k, v in self.tensors().items() if k.startswith(prefix)}

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of modules trained in full, keyed by their name in the trained model."""
        return {k[: -len(FULL_SUFFIX)]: v for k, v in self.tensors().items() if k.endswith(FULL_SUFFIX)}

    def model_tensors(self) -> dict[str, torch.Tensor]:
        prefix = f"{self.method.name}::"
        return {k: v for k, v in self.tensors().items() if k.startswith(prefix)}

    @property
    def config_overrides(self) -> dict[str, Any]:
        return dict(self.metadata.get("config_overrides") or {})

    @property
    def rank_pattern(self) -> dict[str, int] | None:
        return self.metadata.get("rank_pattern")

    def trainable_parameters(self) -> int:
        # A method may record its own count (a hypernetwork's checkpoint also holds the factors
        # it generated, which are not trained); otherwise every saved value was trained.
        recorded = self.metadata.get("trainable_parameters")
        if isinstance(recorded, int):
            return recorded
        return sum(t.numel() for t in self.tensors().values())


def read_safetensors(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    """Load a whole safetensors file, turning every failure into a CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"{what} not found", path=path, hint="check the directory, or re-save the adapter")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{what} are not a readable safetensors file ({exc})", path=path,
                              hint="the file is truncated or of another format; re-save it") from exc


def refuse_pickle(path: Path) -> None:
    """Refuse an adapter directory whose weights are only a pickle (unpickling runs arbitrary code).

    Raises:
        CheckpointError: no safetensors weights (naming the pickle file, if there is one).
    """
    if (path / WEIGHTS_FILE).exists():
        return
    for name in PICKLE_FILES:
        if (path / name).exists():
            raise CheckpointError(f"{name} is a pickle checkpoint, which hypermerge refuses to load "
                                  "(unpickling runs arbitrary code)", path=path / name,
                                  hint=f"convert it to {WEIGHTS_FILE} with safetensors.torch.save_file")
    raise CheckpointError(f"no {WEIGHTS_FILE} in the adapter directory", path=path,
                          hint="the checkpoint is incomplete; re-save it")
