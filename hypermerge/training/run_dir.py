"""The run directory: what it holds, checking it before a run, writing into it, and the resume checks.

    OUTPUT_DIR/adapter/ (or model/)   the trained adapter (a full fine-tune: the HF model directory)
    OUTPUT_DIR/metrics.json           what the run measured (training.metrics)
    OUTPUT_DIR/plots/                 loss and rank-budget plots
    OUTPUT_DIR/recipe.yaml            the recipe as run (defaults filled in, overrides applied)
    OUTPUT_DIR/checkpoints/           the Trainer's checkpoints (adapter + exact training state)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hypermerge.errors import CheckpointError, ConfigError, HypermergeError, OutputExistsError
from hypermerge.training.recipe import Recipe
from hypermerge.training.typed_yaml import parse_yaml

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
# What a run directory holds; --overwrite removes these and nothing else.
RUN_ENTRIES = ("adapter", "model", CHECKPOINTS_DIR, "plots", METRICS_FILE, RECIPE_FILE)


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint of the latest step that was written to the end, if any.

    The Trainer writes a checkpoint's files in place and trainer_state.json last, so a run killed
    while saving leaves a newer directory without it (or with it cut short): that one is skipped.
    """
    if not checkpoints.is_dir():
        return None
    steps = []
    for entry in checkpoints.iterdir():
        prefix, _, step = entry.name.rpartition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and entry.is_dir():
            steps.append((int(step), entry))
    for _step, entry in sorted(steps, reverse=True):
        try:
            json.loads((entry / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return entry
    return None


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Check the run directory (read-only) and return the checkpoint to resume from, if any.

    Raises:
        OutputExistsError: it holds a run and neither --resume nor --overwrite was given.
        CheckpointError: --resume with no checkpoint to resume from.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError("the output path is a file", path=out, hint="choose another --output-dir")
    existing = next(p for p in (out, *out.parents) if p.exists())  # checked before any work: fail fast
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise HypermergeError("cannot create the run directory here" + (f" ({existing} is a file)"
                              if not existing.is_dir() else " (not writable)"), path=out,
                              hint="choose a writable --output-dir")
    checkpoints = out / CHECKPOINTS_DIR
    if resume:
        last = last_complete_checkpoint(checkpoints)
        if last is None:
            raise CheckpointError("no checkpoint to resume from", path=checkpoints,
                                  hint="run without --resume to start (checkpoints are written every "
                                       "training.save_steps steps)")
        return Path(last)
    existing = [name for name in RUN_ENTRIES if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"the output directory already holds a run ({', '.join(existing)})", path=out,
                                hint="pass --resume to continue it, --overwrite to start over, "
                                     "or choose another --output-dir")
    return None


def remove_run_entries(out: Path) -> None:
    """Remove a previous run's files (``RUN_ENTRIES``) from ``out``, and nothing else."""
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def disk_errors() -> Iterator[dict[str, Path]]:
    """Turn a write that fails for want of space or permission (in our code or the Trainer's
    checkpointing) into one line naming the file; checkpoints cut short are skipped by --resume."""
    context: dict[str, Path] = {}
    try:
        yield context
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else context.get("run")
        if exc.errno == errno.EFBIG:
            raise HypermergeError(f"a file grew past the largest file allowed here ({exc.strerror})", path=where,
                                  hint="raise the file size limit (ulimit -f) or write to another filesystem") from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HypermergeError(f"ran out of disk space ({exc.strerror})", path=where,
                                  hint="free space or choose another --output-dir, then --resume") from exc
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM) and where is not None:
            raise HypermergeError(f"cannot write ({exc.strerror})", path=where,
                                  hint="check permissions or choose another --output-dir") from exc
        raise


def resolved_recipe(recipe: Recipe, adapter_config: Any | None) -> dict[str, Any]:
    """The recipe as run: defaults filled in, overrides applied, the adapter config complete
    (``total_steps`` from the schedule, the new head in ``modules_to_save``)."""
    resolved = recipe.to_dict()
    if adapter_config is not None:
        resolved["adapter"] = {"method": recipe.adapter.method, **adapter_config.to_dict()}
    return json.loads(json.dumps(resolved))  # plain lists and numbers, as read back from YAML


def check_resume_recipe(saved_path: Path, resolved: dict[str, Any]) -> list[str]:
    """Refuse to resume with a recipe that changes what is trained; return the training keys that differ."""
    if not saved_path.exists():
        return []
    saved = parse_yaml(saved_path.read_text(), path=saved_path) or {}
    changed = [f"{section}" for section in ("model", "task", "data", "adapter")
               if saved.get(section) != resolved.get(section)]
    if changed:
        raise ConfigError(f"the recipe differs from the one this run was started with in: {', '.join(changed)}",
                          path=saved_path, hint="resume with the same recipe, or start a new run (--overwrite "
                                                "or another --output-dir)")
    saved_training = saved.get("training") or {}
    return sorted(k for k, v in resolved["training"].items() if saved_training.get(k) != v)


def yaml_text(values: dict[str, Any]) -> str:
    """The resolved recipe as YAML, in the recipe's own key order."""
    return yaml.safe_dump(values, sort_keys=False)
