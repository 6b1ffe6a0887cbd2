"""Export tasks: which one a model is (from ``config.architectures``). The contracts themselves
(names, :class:`IOContract`) are the runtime's, :mod:`hypermerge.runtime.contract`: re-exported here."""

from __future__ import annotations

import json
from pathlib import Path

from hypermerge.errors import ConfigError, ExportError
from hypermerge.runtime.contract import (
    BATCH,
    CAUSAL_LM,
    FEATURE_EXTRACTION,
    PAST,
    SEQUENCE,
    SEQUENCE_CLASSIFICATION,
    TASKS,
    TOTAL,
    IOContract,
    contract_from_onnx,
    past_names,
    present_names,
)

__all__ = ["BATCH", "CAUSAL_LM", "FEATURE_EXTRACTION", "PAST", "SEQUENCE", "SEQUENCE_CLASSIFICATION", "TASKS", "TOTAL",
           "IOContract", "check_task", "contract_from_onnx", "detect_task", "past_names", "present_names",
           "read_config"]


def read_config(model_dir: Path) -> dict:
    """The parsed config.json of a model directory.

    Raises:
        ExportError: no config.json, or it is not JSON.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ExportError("not a model directory: no config.json", path=model_dir,
                          hint="pass a Hugging Face model directory (save_pretrained, or hypermerge fold's output)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"config.json is not valid JSON ({exc})", path=path,
                          hint="re-save the model with save_pretrained") from exc


def detect_task(config: dict, path: Path | None = None) -> str:
    """The export task for a model, from the first entry of ``config["architectures"]``.

    ``*ForCausalLM`` / ``*LMHeadModel`` -> causal-lm, ``*ForSequenceClassification`` ->
    sequence-classification, a bare encoder (``BertModel``, ``XLMRobertaModel``...) -> feature-extraction.

    Raises:
        ExportError: the architecture is missing or not one of those (the hint says to pass --task).
    """
    architectures = config.get("architectures") or []
    hint = f"pass --task ({', '.join(TASKS)})"
    if not architectures:
        raise ExportError("cannot detect the task: config.json has no 'architectures'", path=path, hint=hint)
    arch = architectures[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    if arch.endswith("ForSequenceClassification"):
        return SEQUENCE_CLASSIFICATION
    if arch.endswith("Model") and "For" not in arch:
        # a bare stack (BertModel, or a decoder without its LM head) exports its hidden states
        return FEATURE_EXTRACTION
    raise ExportError(f"cannot export the architecture {arch}: no supported task matches it", path=path, hint=hint)


def check_task(task: str) -> str:
    """Validate a --task value.

    Raises:
        ConfigError: unknown task.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", hint=f"use one of: auto, {', '.join(TASKS)}")
    return task
