"""Training killed with SIGKILL right after a checkpoint and resumed with ``--resume`` ends with
the adapter (bit for bit) and the loss curve of an uninterrupted run with the same seed; a
checkpoint cut short by the kill is skipped, not resumed from.

(tests/training/test_resume.py interrupts in-process with KeyboardInterrupt; this is the real
thing: a separate process, killed without warning.)
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers.common import subprocess_env
from tests.helpers.reliability import World
from tests.helpers.training import write_recipe

ENV = {"OMP_NUM_THREADS": "1"}  # both runs alike: the same kernels, the same rounding


def _recipe(world: World, tmp: Path) -> Path:
    raw = json.loads(json.dumps(world.recipe))
    raw["adapter"] = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}  # dropout: the RNG must resume too
    raw["training"].update(max_steps=24, save_steps=4, logging_steps=1, seed=3)
    return write_recipe(tmp / "recipe.yaml", raw)


def _train(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hypermerge", "train", str(recipe), "--output-dir", str(out), "-q",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(**ENV))


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in json.loads((out / "metrics.json").read_text())["train_log"] if "loss" in e]


def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(world, tmp_path):
    recipe = _recipe(world, tmp_path)
    straight = _train(recipe, tmp_path / "straight")

    killed = tmp_path / "killed"
    process = _train(recipe, killed)
    first = killed / "checkpoints" / "checkpoint-4" / "trainer_state.json"  # written last: the checkpoint is whole
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    _finish(straight)
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (killed / "adapter").exists() and not (killed / "metrics.json").exists()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (killed / "checkpoints").iterdir())
    assert checkpoints and max(checkpoints) < 24

    # A checkpoint the kill cut short (files in place, trainer_state.json not yet written):
    # resume must take the last whole one.
    partial = killed / "checkpoints" / f"checkpoint-{max(checkpoints) + 4}"
    shutil.copytree(killed / "checkpoints" / f"checkpoint-{max(checkpoints)}", partial)
    (partial / "trainer_state.json").unlink()
    raw = (partial / "training_state.safetensors").read_bytes()
    (partial / "training_state.safetensors").write_bytes(raw[: len(raw) // 2])

    _finish(_train(recipe, killed, "--resume"))
    expected = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    actual = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert _losses(killed) == _losses(tmp_path / "straight")
    assert len(_losses(killed)) == 24
