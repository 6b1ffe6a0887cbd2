"""DDP on the CPU (gloo) through torchrun: every rank ends with the same adapter, and it matches
a one-process run with the same global batch (the recipe's batch_size is the global batch)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import hypermerge as hm
from tests.helpers.common import subprocess_env
from tests.helpers.training import tiny_recipe, write_recipe


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    # --standalone: a private rendezvous on a free port (others may be training on this machine)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "hypermerge", *args]
    # a session of its own, so a hung run's workers can be killed with the launcher
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env=subprocess_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")) as process:
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def ddp_matches_one_process(tiny, tmp_path, task: str, method: str, tolerance: float) -> None:
    recipe = tiny_recipe(tiny, task, method, max_steps=8, save_steps=4, eval_steps=4)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)

    done = torchrun(["train", str(path), "--output-dir", str(tmp_path / "ddp"), "--quiet"])
    assert done.returncode == 0, done.stderr[-3000:]
    single = hm.train(recipe, output_dir=tmp_path / "single", quiet=True)

    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["per_device_batch"] == 4 and metrics["global_batch"] == 8
    digests = metrics["trained_values_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold the same trained values
    # the printed summary comes from rank 0 only
    assert done.stdout.count("trained ") == 1

    ddp = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(single.adapter_dir / "adapter_model.safetensors"))
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=0, atol=tolerance, msg=key)
    # the comparison means something: the last 4 steps alone moved the values far more than that
    halfway = hm.read_adapter(tmp_path / "ddp" / "checkpoints" / "checkpoint-4" / "adapter").tensors()
    assert max(float((one[k] - halfway[k]).abs().max()) for k in one) > 100 * tolerance
    assert abs(metrics["train_log"][0]["loss"] - single.metrics["train_log"][0]["loss"]) < 1e-4
    shutil.rmtree(tmp_path / "ddp")


def test_ddp_two_processes_match_one(tiny, tmp_path):
    ddp_matches_one_process(tiny, tmp_path, "sequence-classification", "hyperadapt", tolerance=1e-4)


@pytest.mark.slow
def test_ddp_causal_lm_lora(tiny, tmp_path):
    # token-level loss: averaged over the tokens of the whole global batch across processes
    ddp_matches_one_process(tiny, tmp_path, "causal-lm", "lora", tolerance=1e-4)
