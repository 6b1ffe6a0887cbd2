"""The base model recognised by content: its ``model_type`` and a sample of every targeted weight.

Names and shapes tell architectures apart, not two checkpoints of one architecture (a Llama and
a Qwen2 of equal sizes, or two fine-tunes of one model). So ``save_adapter`` records, for each
weight the adapter targets, a fixed sample of its values: ``BLOCKS`` evenly spaced runs of
``RUN`` contiguous elements (a few positional reads per weight, so a 70B base is sampled in
seconds), converted to float32 and rounded to bfloat16 precision. fold and patch read the same
positions of the base they are given and compare.

Why samples compared within one bfloat16 step and not a hash of them: a bf16 copy of an fp32
base rounds each value once, to exactly the recorded bf16 value, so a hash would survive that
cast; but a float16 copy rounds twice (to fp16, then our rounding to bf16), and about one value
in sixteen then lands on the other side of a bf16 tie, so a hash would call the fp16 copy of the
very same base "different". Kept values (64 bytes per weight) compared within one bf16 step (plus
fp16's subnormal spacing) recognise every cast of the same base, while another model differs
by far more at almost every position. The sha256 of the samples names the base in certificates.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

VERSION = 1
BLOCKS = 8
RUN = 4
# one bf16 step relative, plus float16's subnormal spacing absolute (a fp16 copy of tiny values)
REL_TOLERANCE = 2.0**-7
ABS_TOLERANCE = 2.0**-24


def sample_runs(numel: int) -> list[tuple[int, int]]:
    """(start, length) of the runs sampled from a tensor of ``numel`` elements (row-major, as stored)."""
    if numel <= BLOCKS * RUN:
        return [(0, numel)] if numel else []
    starts = [(2 * k + 1) * (numel - RUN) // (2 * BLOCKS) for k in range(BLOCKS)]
    return [(start, RUN) for start in starts]


def sample_of(flat_values: Any) -> np.ndarray:
    """The sample of a tensor given as a flat float array (numpy or torch, any float dtype)."""
    if hasattr(flat_values, "detach"):  # torch, without importing it here
        flat_values = flat_values.detach().reshape(-1)
        runs = sample_runs(int(flat_values.numel()))
        parts = [flat_values[start:start + length].float().cpu().numpy() for start, length in runs]
    else:
        flat_values = np.asarray(flat_values).reshape(-1)
        runs = sample_runs(flat_values.size)
        parts = [flat_values[start:start + length].astype(np.float32) for start, length in runs]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0
    return rounded


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode(sample: np.ndarray) -> str:
    return base64.b64encode(to_bf16_bits(sample).astype("<u2").tobytes()).decode("ascii")


def decode(text: str) -> np.ndarray:
    return from_bf16_bits(np.frombuffer(base64.b64decode(text, validate=True), dtype="<u2"))


def same_sample(recorded: np.ndarray, actual: np.ndarray) -> bool:
    """Whether two samples come from the same values, whatever casts lie between them."""
    if recorded.shape != actual.shape:
        return False
    actual = from_bf16_bits(to_bf16_bits(actual))
    both_nan = np.isnan(recorded) & np.isnan(actual)
    with np.errstate(invalid="ignore"):
        close = np.abs(recorded - actual) <= REL_TOLERANCE * np.maximum(np.abs(recorded), np.abs(actual)) \
            + ABS_TOLERANCE
    return bool(np.all(close | both_nan | (recorded == actual)))


@dataclasses.dataclass
class BaseDigest:
    """What an adapter records of its base's content."""

    model_type: str | None
    weights: dict[str, str]  # base weight name -> encoded sample
    version: int = VERSION

    @property
    def sha256(self) -> str:
        """One digest for the whole record, to name the base in certificates."""
        text = json.dumps({"model_type": self.model_type, "weights": self.weights}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model_type": self.model_type, "samples": "bf16 runs",
                "sha256": self.sha256, "weights": self.weights}

    @classmethod
    def from_dict(cls, raw: Any) -> BaseDigest:
        """Parse the recorded form; raises ValueError on anything malformed."""
        if not isinstance(raw, Mapping) or raw.get("version") != VERSION:
            raise ValueError("base_digest must be an object of version 1")
        model_type, weights = raw.get("model_type"), raw.get("weights")
        if model_type is not None and not isinstance(model_type, str):
            raise ValueError("base_digest.model_type must be a string")
        if not isinstance(weights, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weights.items()):
            raise ValueError("base_digest.weights must map weight names to strings")
        for name, text in weights.items():
            try:
                decode(text)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"base_digest of {name} is not a valid sample") from exc
        return cls(model_type, dict(weights))


@dataclasses.dataclass
class BaseComparison:
    """The outcome of comparing a base with an adapter's record of its base."""

    same: bool
    checked: int  # weights compared
    first_difference: str | None = None  # a weight name, or "model_type"
    detail: str = ""


def compare(digest: BaseDigest, samples: Mapping[str, np.ndarray], model_type: str | None) -> BaseComparison:
    """Compare recorded samples with those read from a base (by the recorded weight names).

    Args:
        digest: the adapter's record.
        samples: the given base's sample per recorded weight name (absent: not comparable).
        model_type: the given base's ``model_type`` (None: unknown).
    """
    checked = 0
    for name, text in digest.weights.items():
        actual = samples.get(name)
        if actual is None:
            continue
        checked += 1
        if not same_sample(decode(text), actual):
            return BaseComparison(False, checked, name, f"{name} holds other values")
    if digest.model_type and model_type and digest.model_type != model_type:
        return BaseComparison(False, checked, "model_type",
                              f"it is a {model_type} model, the adapter was trained on a {digest.model_type}")
    return BaseComparison(True, checked)
