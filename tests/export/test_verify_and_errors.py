"""``hypermerge verify`` and the export CLI's failure modes: one line, non-zero exit, nothing left."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.export.parity import Tolerance
from tests.helpers.cli import assert_one_line_error
from tests.helpers.common import save_tiny, subprocess_env, tiny_model
from tests.helpers.export import FAST


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    source = save_tiny("bert", root / "source")
    hm.export_model(source, root / "onnx", verify=False, **FAST)  # verify fills the certificate in below
    return root, source, root / "onnx"


def run(args):
    return CliRunner().invoke(cli, args)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if "hm-tmp" in p.name)


def test_verify_passes_and_rewrites_the_report(bert_export):
    _, source, out = bert_export
    before = json.loads((out / "report.json").read_text())
    assert before["parity"] is None and before["latency"] is None
    assert "not checked (--no-verify)" in (out / "report.md").read_text()
    result = run(["verify", str(out), "--iters", "3", "--batch", "2", "--seq", "8", "-q"])
    assert result.exit_code == 0, result.output
    assert "parity passed" in result.output and "| logits |" in result.output
    after = json.loads((out / "report.json").read_text())
    assert after["parity"]["passed"] and after["verified_at"] and after["created_at"] == before["created_at"]
    assert after["source"]["weights_changed_since_export"] is False


def test_weights_changed_after_export_make_verify_fail(tmp_path):
    source = save_tiny("bert", tmp_path / "source")
    hm.export_model(source, tmp_path / "onnx", **FAST)
    model = tiny_model("bert")
    with torch.no_grad():  # another fine-tune of one matrix (init std 0.02)
        weight = model.bert.encoder.layer[1].output.dense.weight
        weight.add_(0.02 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(source)
    result = run(["verify", str(tmp_path / "onnx"), "--iters", "2", "-q"])
    assert_one_line_error(result, "verification failed", "logits", "max abs err", "weights changed since export")
    report = json.loads((tmp_path / "onnx" / "report.json").read_text())
    assert report["parity"]["passed"] is False and not report["parity"]["outputs"]["logits"]["passed"]
    assert report["source"]["weights_changed_since_export"] is True
    assert "**NO**" in (tmp_path / "onnx" / "report.md").read_text()
    with pytest.raises(hm.ParityError):
        hm.verify_export(tmp_path / "onnx", iters=2, progress=False)


def test_verify_with_explicit_source_and_missing_source(bert_export, tmp_path):
    root, source, out = bert_export
    report = hm.verify_export(out, source=source, iters=2, batch=1, seq=4, progress=False)
    assert report.passed and report["latency"]["seq"] == 4
    strict = run(["verify", str(out), "--atol", "-1", "--rtol", "0", "--iters", "2", "-q"])
    assert_one_line_error(strict, "verification failed", "logits max abs err", "allowed -1")
    assert json.loads((out / "report.json").read_text())["parity"]["tolerance"] == {"atol": -1.0, "rtol": 0.0}
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.onnx").write_bytes((out / "model.onnx").read_bytes())
    assert_one_line_error(run(["verify", str(lone)]), "not recorded", "--source")
    assert_one_line_error(run(["verify", str(tmp_path / "nope")]), "not found")


def test_parity_failure_at_export_names_the_output_and_leaves_nothing(tmp_path):
    source = save_tiny("bert", tmp_path / "source")
    with pytest.raises(hm.ParityError, match=r"logits max abs err \S+ \(needs atol"):
        hm.export_model(source, tmp_path / "onnx", tolerance=Tolerance(-1.0, 0.0), **FAST)
    assert not (tmp_path / "onnx").exists() and leftovers(tmp_path) == []


def test_not_a_model_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]),
                          "not a model directory", "config.json")
    assert_one_line_error(run(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]), "not found")
    assert not (tmp_path / "o").exists()


def test_unknown_task_and_bad_options(bert_export, tmp_path):
    _, source, _ = bert_export
    out = str(tmp_path / "o")
    assert_one_line_error(run(["export", str(source), "--out", out, "--task", "translation"]),
                          "unknown task 'translation'", "causal-lm")
    assert_one_line_error(run(["export", str(source), "--out", out, "--quantize", "int4"]), "int8")
    assert_one_line_error(run(["export", str(source), "--out", out, "--fp16"]), "--trt")
    assert_one_line_error(run(["export", str(source), "--out", out, "--trt", "--shapes", "1x8:4x8"]), "--shapes")
    assert not (tmp_path / "o").exists()


def test_trt_without_tensorrt_writes_nothing(bert_export, tmp_path, monkeypatch):
    _, source, _ = bert_export
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt fails even where it is installed
    result = run(["export", str(source), "--out", str(tmp_path / "o"), "--trt", "--fp16"])
    assert_one_line_error(result, "TensorRT is not installed", "pip install")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_unwritable_out(bert_export, tmp_path):
    _, source, _ = bert_export
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run(["export", str(source), "--out", str(blocker / "sub" / "o"), "-q"])
    assert_one_line_error(result, "cannot create the output's parent")
    assert blocker.read_text() == "x"


def test_existing_out_is_refused(bert_export):
    _, source, out = bert_export
    assert_one_line_error(run(["export", str(source), "--out", str(out)]), "already exists", "--overwrite")
    assert (out / "model.onnx").exists()


def test_cli_subprocess_export_prints_the_table(tmp_path):
    source = save_tiny("bert", tmp_path / "source")
    proc = subprocess.run([sys.executable, "-m", "hypermerge", "export", str(source), "--out", str(tmp_path / "o"),
                           "--batch", "1", "--seq", "8", "--iters", "2", "-q"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "exported sequence-classification" in proc.stdout and "| logits |" in proc.stdout
    assert "| onnxruntime |" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr


def test_onnx_model_load_errors(tmp_path):
    with pytest.raises(hm.CheckpointError, match="not found"):
        hm.OnnxModel.load(tmp_path / "nope")
    with pytest.raises(hm.ExportError, match="ONNX model not found"):
        hm.OnnxModel.load(tmp_path)
    with pytest.raises(hm.ConfigError, match="unknown provider"):
        hm.OnnxModel.load(tmp_path, provider="tpu")
