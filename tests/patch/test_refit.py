"""``hypermerge patch --trt``: the refit logic against a stand-in with TensorRT 10's attribute names
(Runtime, Refitter, Weights; get_all_weights, set_named_weights, get_missing_weights,
refit_cuda_engine). Nothing here has run on a real TensorRT; the ``trt``-marked test is the one
that would, on a GPU machine."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hypermerge as hm
from hypermerge.errors import ExportError
from hypermerge.export import tensorrt as trt_mod
from hypermerge.patch.refit import refit_engine
from tests.helpers.patch import make_adapter, save_base
from tests.helpers.trt_stand_in import Weights, fake_tensorrt

VALUES = {"val_54": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(3, np.float32),
          "fused_with_val_54": np.full(3, 7, np.float32)}


def test_changed_weights_and_the_ones_tensorrt_asks_for_are_set(tmp_path):
    trt, calls = fake_tensorrt(["val_54", "bias", "fused_with_val_54"], missing=["fused_with_val_54"])
    (tmp_path / "model.engine").write_bytes(b"ENGINE")
    section = refit_engine(trt, tmp_path / "model.engine", tmp_path / "new.engine", ["val_54", "bias"],
                           VALUES.__getitem__)
    assert set(calls["set"]) == {"val_54", "bias", "fused_with_val_54"} and calls["refit"] == 1
    np.testing.assert_array_equal(calls["set"]["val_54"], VALUES["val_54"])
    assert section["refitted"] == 2 and section["resupplied_unchanged"] == ["fused_with_val_54"]
    assert (tmp_path / "new.engine").read_bytes() == b"REFITTED:bias,fused_with_val_54,val_54"


def test_prototype_sizes_are_checked(tmp_path):
    prototypes = {"val_54": Weights(np.zeros(5, np.float32))}
    trt, _ = fake_tensorrt(["val_54"], prototypes=prototypes)
    (tmp_path / "model.engine").write_bytes(b"ENGINE")
    with pytest.raises(ExportError, match="holds 5 values for val_54"):
        refit_engine(trt, tmp_path / "model.engine", tmp_path / "new.engine", ["val_54"], VALUES.__getitem__)


@pytest.mark.parametrize(("kwargs", "changed", "message"), [
    ({"refittable": ["bias"]}, ["val_54", "bias"], "no refittable weight val_54"),
    ({"refittable": ["val_54"], "refit_ok": False}, ["val_54"], "refit failed"),
    ({"refittable": ["val_54"], "engine_refittable": False}, ["val_54"], "without the REFIT flag"),
    ({"refittable": ["val_54"], "missing": ["not_an_initializer"]}, ["val_54"], "needs not_an_initializer again"),
])
def test_refit_failures_are_one_clear_error(tmp_path, kwargs, changed, message):
    trt, _ = fake_tensorrt(**kwargs)
    (tmp_path / "model.engine").write_bytes(b"ENGINE")
    with pytest.raises(ExportError, match=message):
        refit_engine(trt, tmp_path / "model.engine", tmp_path / "new.engine", changed, VALUES.__getitem__)
    assert not (tmp_path / "new.engine").exists()


def test_patch_trt_refits_the_engine_of_the_export(exported, adapters, tmp_path, monkeypatch):
    """The whole ``patch --trt`` path up to the engine (parity on the engine needs a GPU: verify off)."""
    import shutil

    import onnx

    _, onnx_dir = exported["bert"]
    export = tmp_path / "export"
    shutil.copytree(onnx_dir, export)
    (export / "model.engine").write_bytes(b"ENGINE")
    names = [t.name for t in onnx.load(str(export / "model.onnx")).graph.initializer]
    trt, calls = fake_tensorrt(names)
    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: trt)
    result = hm.patch_export(export, adapters("bert", "lora"), tmp_path / "out", trt=True, verify=False,
                             progress=False)
    assert result.dropped == [] and result.tensorrt["refit"]["refitted"] == result.initializers
    assert len(calls["set"]) == result.initializers
    assert (tmp_path / "out" / "model.engine").read_bytes().startswith(b"REFITTED:")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tensorrt"]["refit"]["method"].startswith("trt.Refitter")


@pytest.mark.trt
def test_real_engine_refit_keeps_parity(tmp_path):
    """On a GPU with TensorRT: export --trt, patch --trt, and the refitted engine's parity passes."""
    base = save_base("bert", tmp_path / "base")
    hm.export_model(base, tmp_path / "onnx", trt=True, batch=2, seq=8, iters=2, progress=False)
    adapter = make_adapter("hyperadapt", "bert", base, tmp_path / "adapter")
    result = hm.patch_export(tmp_path / "onnx", adapter, tmp_path / "out", trt=True, progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result.parity["passed"] and report["tensorrt"]["parity"]["passed"]
