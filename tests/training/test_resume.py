"""An interrupted run resumed with --resume ends with the adapter an uninterrupted run produces."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import hypermerge as hm
from hypermerge.adapters import registry
from hypermerge.cli import cli
from tests.helpers.fake_rank_method import FakeRank
from tests.helpers.training import Interrupt, tiny_recipe, write_recipe


def trained_values(run) -> dict[str, torch.Tensor]:
    name = "adapter/adapter_model.safetensors" if (run / "adapter").exists() else "model/model.safetensors"
    return load_file(str(run / name))


CASES = {
    "hyperadapt-classification": ("sequence-classification", "hyperadapt", {}),
    # dropout on the adapter branch: resume must restore the random state too
    "lora-dropout-causal": ("causal-lm", "lora", {"dropout": 0.2}),
    # a rank-allocating method: masks and allocator statistics live in buffers
    "fakerank-classification": ("sequence-classification", "fakerank", {}),
    "full-causal": ("causal-lm", "full", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_gives_the_uninterrupted_adapter(case, tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, FakeRank.name, FakeRank)
    task, method, adapter = CASES[case]
    recipe = tiny_recipe(tiny, task, method, adapter=adapter, max_steps=12, save_steps=5, eval_steps=4)

    straight = hm.train(recipe, output_dir=tmp_path / "straight", quiet=True)

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        hm.train(recipe, output_dir=interrupted, quiet=True, callbacks=[Interrupt(7)])
    # nothing half-written: no final artifacts, only the checkpoint at step 5
    assert not (interrupted / "adapter").exists() and not (interrupted / "model").exists()
    assert not (interrupted / "metrics.json").exists()
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["checkpoint-5"]
    if method != "full":
        # every checkpoint holds a foldable adapter
        assert hm.read_adapter(interrupted / "checkpoints" / "checkpoint-5" / "adapter").method.name == method

    resumed = hm.train(recipe, output_dir=interrupted, resume=True, quiet=True)
    assert resumed.resumed_from == interrupted / "checkpoints" / "checkpoint-5"
    assert resumed.metrics["steps"] == 12

    expected, actual = trained_values(tmp_path / "straight"), trained_values(interrupted)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    # the logged history continues: the same losses at the same steps
    straight_losses = [(e["step"], round(e["loss"], 5)) for e in straight.metrics["train_log"]]
    resumed_losses = [(e["step"], round(e["loss"], 5)) for e in resumed.metrics["train_log"]]
    assert resumed_losses == straight_losses
    if method == "fakerank":
        assert resumed.metrics["rank_budget"] == straight.metrics["rank_budget"]


def test_resume_refuses_a_changed_recipe(tiny, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny, "sequence-classification", "lora", max_steps=4, save_steps=2)
    hm.train(recipe, output_dir=out, quiet=True)
    changed = write_recipe(tmp_path / "changed.yaml", tiny_recipe(tiny, "sequence-classification", "lora",
                                                                  adapter={"r": 8}, max_steps=4, save_steps=2))
    result = CliRunner().invoke(cli, ["train", str(changed), "--output-dir", str(out), "--resume", "-q"])
    assert result.exit_code == 2
    assert "differs from the one this run was started with in: adapter" in result.output
