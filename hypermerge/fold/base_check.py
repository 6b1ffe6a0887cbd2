"""Is the base given the base the adapter was trained on? Compared by content, before writing.

The adapter records a sample of every targeted weight (``adapters/base_digest.py``); here the
same positions are read from the base given (a few positional reads per weight, from the
safetensors shards for fold, from the ONNX initializers for patch) and compared. A different
base is refused with one line naming the first differing weight, the base recorded and the base
given, unless the caller allows another base; either way the outcome goes into the provenance.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hypermerge.adapters import base_digest as digests
from hypermerge.errors import AdapterMismatchError
from hypermerge.fold.hfdir import BaseCheckpoint
from hypermerge.fold.safetensors_io import CASTABLE, ITEMSIZE, TensorEntry, read_tensor

SAME = "same base"
OTHER_ALLOWED = "other base allowed"
NOT_CHECKED = "not checked"


@dataclasses.dataclass
class BaseCheck:
    """How the base was checked, for the provenance, the report and the certificate."""

    status: str  # SAME, OTHER_ALLOWED or NOT_CHECKED
    detail: str
    recorded_base: str | None
    given_base: str
    base_digest: str | None = None  # sha256 of the adapter's record of its base
    weights_compared: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_type_of(model_dir: Path) -> str | None:
    """``model_type`` from a directory's config.json (None if there is none)."""
    try:
        value = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def check_base(checkpoint, given: Path, read_sample: Callable[[str], np.ndarray | None],
               names: Mapping[str, str], *, allow_other_base: bool, what: str = "fold") -> BaseCheck:
    """Compare the adapter's record of its base with the base given.

    Args:
        checkpoint: the ``AdapterCheckpoint``.
        given: the base given (a model directory, or an export directory).
        read_sample: the sample of one weight of the given base, by its name there (None: absent).
        names: adapter target name -> the weight's name in the given base.
        allow_other_base: fold/patch a different base anyway (recorded, not refused).
        what: the command, for the hint.

    Raises:
        AdapterMismatchError: the base differs and ``allow_other_base`` is false.
    """
    start = time.perf_counter()
    recorded = checkpoint.base_model
    digest = checkpoint.base_digest
    if digest is None:
        why = ("PEFT adapters record no content of their base" if checkpoint.metadata.get("source") == "peft"
               else "the adapter was saved before hypermerge recorded base digests")
        return BaseCheck(NOT_CHECKED, f"the base was not checked: {why}", recorded, str(given))
    samples = {}
    for target in digest.weights:
        name = names.get(target)
        sample = read_sample(name) if name is not None else None
        if sample is not None:
            samples[target] = sample
    comparison = digests.compare(digest, samples, model_type_of(given))
    seconds = time.perf_counter() - start
    if comparison.same:
        return BaseCheck(SAME, f"by content: the base matches the adapter's record ({comparison.checked} weights "
                               "sampled)", recorded, str(given), digest.sha256, comparison.checked, seconds)
    message = (f"the base given is not the one the adapter was trained on: {comparison.detail} "
               f"(base recorded: {recorded or 'unknown path'}; base given: {given})")
    if not allow_other_base:
        raise AdapterMismatchError(message, path=checkpoint.path,
                                   hint=f"{what} onto the adapter's own base, or pass --allow-other-base to {what} "
                                        "anyway")
    return BaseCheck(OTHER_ALLOWED, f"--allow-other-base: {message}", recorded, str(given), digest.sha256,
                     comparison.checked, seconds)


def checkpoint_sampler(base: BaseCheckpoint) -> Callable[[str], np.ndarray | None]:
    """A ``read_sample`` over a base's safetensors shards: only the sampled runs are read."""

    def read_sample(name: str) -> np.ndarray | None:
        if name not in base.shard_of:
            return None
        entry, path = base.entry(name), base.shard_of[name]
        if entry.dtype not in CASTABLE:
            return None
        size = ITEMSIZE[entry.dtype]
        parts = []
        with open(path, "rb", buffering=0) as handle:
            for start, length in digests.sample_runs(entry.numel):
                begin = entry.begin + start * size
                run = TensorEntry(name, entry.dtype, (length,), begin, begin + length * size)
                parts.append(read_tensor(handle, run, path).float().numpy())
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    return read_sample
