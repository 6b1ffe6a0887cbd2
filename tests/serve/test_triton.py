"""The Triton model repository: layout, config.pbtxt parsed against Triton's ModelConfig schema, and
its I/O consistent with the ONNX graph it ships (names, types, dims, run as Triton would feed it).
Triton itself is not run here."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.serve import write_triton_repo

ORT_TO_TRITON = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32", "tensor(int32)": "TYPE_INT32",
                 "tensor(float16)": "TYPE_FP16", "tensor(bool)": "TYPE_BOOL"}
DATA_TYPES = ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
              "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
              "TYPE_BF16"]


def model_config_class():
    """The part of Triton's ``inference.ModelConfig`` that hypermerge writes, with the field names,
    types and numbers of triton-inference-server/common's protobuf/model_config.proto. Parsing with
    protobuf's text_format refuses unknown fields, wrong types and unknown enum names, as Triton does."""
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="hm_model_config_subset.proto", package="inference",
                                               syntax="proto3")
    data_type = proto.enum_type.add(name="DataType")
    for number, name in enumerate(DATA_TYPES):
        data_type.value.add(name=name, number=number)

    def message(name, fields, enums=()):
        msg = proto.message_type.add(name=name)
        for enum_name, values in enums:
            enum = msg.enum_type.add(name=enum_name)
            for number, value in enumerate(values):
                enum.value.add(name=value, number=number)
        for field_name, number, kind, repeated, type_name in fields:
            field = msg.field.add(name=field_name, number=number, type=kind,
                                  label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if type_name:
                field.type_name = type_name

    tensor = [("name", 1, F.TYPE_STRING, False, None), ("data_type", 2, F.TYPE_ENUM, False, ".inference.DataType")]
    message("ModelInput", [*tensor, ("dims", 4, F.TYPE_INT64, True, None), ("allow_ragged_batch", 7, F.TYPE_BOOL,
                                                                           False, None)])
    message("ModelOutput", [*tensor, ("dims", 3, F.TYPE_INT64, True, None),
                            ("label_filename", 4, F.TYPE_STRING, False, None)])
    message("ModelDynamicBatching", [("preferred_batch_size", 1, F.TYPE_INT32, True, None),
                                     ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, False, None)])
    message("ModelInstanceGroup", [("name", 1, F.TYPE_STRING, False, None), ("count", 2, F.TYPE_INT32, False, None),
                                   ("gpus", 3, F.TYPE_INT32, True, None),
                                   ("kind", 4, F.TYPE_ENUM, False, ".inference.ModelInstanceGroup.Kind")],
            enums=[("Kind", ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"])])
    message("ModelConfig", [("name", 1, F.TYPE_STRING, False, None), ("platform", 2, F.TYPE_STRING, False, None),
                            ("max_batch_size", 4, F.TYPE_INT32, False, None),
                            ("input", 5, F.TYPE_MESSAGE, True, ".inference.ModelInput"),
                            ("output", 6, F.TYPE_MESSAGE, True, ".inference.ModelOutput"),
                            ("instance_group", 7, F.TYPE_MESSAGE, True, ".inference.ModelInstanceGroup"),
                            ("default_model_filename", 8, F.TYPE_STRING, False, None),
                            ("dynamic_batching", 11, F.TYPE_MESSAGE, False, ".inference.ModelDynamicBatching"),
                            ("backend", 17, F.TYPE_STRING, False, None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = model_config_class()
KIND = ModelConfig.DESCRIPTOR.fields_by_name["instance_group"].message_type.enum_types_by_name["Kind"]
DATA_TYPE = ModelConfig.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type


def parse_config(path):
    return text_format.Parse(path.read_text(), ModelConfig())


def feeds_for(config, batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    """Inputs shaped as a Triton client would send them: [batch] + dims, -1 chosen per axis role."""
    feeds, rng = {}, np.random.default_rng(0)
    for tensor in config.input:
        if tensor.name.startswith("past_"):  # (kv_heads, past, head_dim): an empty cache (prefill)
            shape = [batch, tensor.dims[0], 0, tensor.dims[2]]
            feeds[tensor.name] = np.zeros(shape, dtype=np.float32)
            continue
        assert list(tensor.dims) == [-1], tensor
        if tensor.name == "input_ids":
            feeds[tensor.name] = rng.integers(1000, 2000, (batch, seq))
        elif tensor.name == "position_ids":
            feeds[tensor.name] = np.tile(np.arange(seq), (batch, 1))
        elif tensor.name == "attention_mask":
            feeds[tensor.name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feeds[tensor.name] = np.zeros((batch, seq), dtype=np.int64)
    return feeds


@pytest.mark.parametrize("task", ["feature-extraction", "sequence-classification", "causal-lm"])
def test_repository_layout_and_io_match_the_graph(exports, tmp_path, task):
    export = exports[task]
    result = write_triton_repo(export, tmp_path / "repo", name=f"tiny-{task}", max_batch=16, instances=2, kind="cpu")
    model_dir = tmp_path / "repo" / f"tiny-{task}"
    assert result.model_dir == model_dir and result.config == model_dir / "config.pbtxt"
    expected_files = {"config.pbtxt", "1/model.onnx"} | ({"labels.txt"} if task == "sequence-classification" else set())
    assert set(result.files) == expected_files == {str(p.relative_to(model_dir)) for p in model_dir.rglob("*")
                                                   if p.is_file()}
    assert [p.name for p in (tmp_path / "repo").iterdir()] == [f"tiny-{task}"]  # no temporaries left

    config = parse_config(result.config)
    assert config.name == f"tiny-{task}" and config.backend == "onnxruntime"
    assert config.default_model_filename == "model.onnx" and config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    (group,) = config.instance_group
    assert group.count == 2 and KIND.values_by_number[group.kind].name == "KIND_CPU"

    # the config's I/O is the graph's (as onnxruntime, the Triton backend, sees it) and the export's contract
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    report = json.loads((export / "report.json").read_text())
    type_name = DATA_TYPE.values_by_number
    for declared, actual, contract in ((config.input, session.get_inputs(), report["inputs"]),
                                       (config.output, session.get_outputs(), report["outputs"])):
        assert [t.name for t in declared] == [a.name for a in actual] == [c["name"] for c in contract]
        for tensor, value in zip(declared, actual, strict=True):
            assert type_name[tensor.data_type].name == ORT_TO_TRITON[value.type]
            assert isinstance(value.shape[0], str)  # the batch axis is dynamic: Triton's implicit one
            assert list(tensor.dims) == [d if isinstance(d, int) else -1 for d in value.shape[1:]]

    # fed as Triton would feed it, every output has the declared dims after the batch axis
    feeds = feeds_for(config)
    outputs = session.run(None, feeds)
    for tensor, array in zip(config.output, outputs, strict=True):
        assert array.shape[0] == 2 and len(array.shape) == len(tensor.dims) + 1
        assert all(d == -1 or d == n for d, n in zip(tensor.dims, array.shape[1:], strict=True))
    if task == "sequence-classification":
        (logits,) = config.output
        assert logits.label_filename == "labels.txt"
        labels = (model_dir / "labels.txt").read_text().splitlines()
        assert labels == ["negative", "neutral", "positive"] and outputs[0].shape[1] == len(labels)
    # the export directory's model (its session fuses differently on CPU: float rounding apart)
    np.testing.assert_allclose(outputs[0], hm.OnnxModel.load(export, provider="cpu").run(feeds)[0], atol=1e-5)


def test_existing_models_are_kept_and_overwrite_is_explicit(exports, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(exports["feature-extraction"], repo, name="encoder")
    write_triton_repo(exports["causal-lm"], repo, name="lm", max_batch=0)
    assert sorted(p.name for p in repo.iterdir()) == ["encoder", "lm"]
    lm = parse_config(repo / "lm" / "config.pbtxt")
    assert lm.max_batch_size == 0 and not lm.HasField("dynamic_batching")
    assert list(lm.input[0].dims) == [-1, -1]  # without Triton's batching, the batch axis is in dims
    with pytest.raises(hm.OutputExistsError):
        write_triton_repo(exports["feature-extraction"], repo, name="encoder")
    write_triton_repo(exports["sequence-classification"], repo, name="encoder", overwrite=True)
    assert parse_config(repo / "encoder" / "config.pbtxt").output[0].name == "logits"
    with pytest.raises(hm.ConfigError, match="model name"):
        write_triton_repo(exports["feature-extraction"], repo, name="bad name")
    with pytest.raises(hm.ExportError, match="model.int8.onnx"):
        write_triton_repo(exports["feature-extraction"], repo, name="x", model_file="model.int8.onnx")


def test_cli_triton_and_export_triton_repo(exports, tmp_path, monkeypatch):
    result = CliRunner().invoke(cli, ["triton", str(exports["sequence-classification"]), str(tmp_path / "repo"),
                                      "--name", "clf", "--max-batch", "8", "--kind", "gpu"])
    assert result.exit_code == 0, result.output
    assert "wrote Triton model clf" in result.output and "labels.txt" in result.output
    config = parse_config(tmp_path / "repo" / "clf" / "config.pbtxt")
    assert config.max_batch_size == 8 and KIND.values_by_number[config.instance_group[0].kind].name == "KIND_GPU"

    # `export --triton-repo`: the export itself is tested elsewhere; here, that its result feeds the writer
    import hypermerge.export as export_module
    from hypermerge.export.api import ExportResult, Report

    out = exports["feature-extraction"]
    report = Report(json.loads((out / "report.json").read_text()), out / "report.json")
    monkeypatch.setattr(export_module, "export_model",
                        lambda *args, **kwargs: ExportResult(out, "feature-extraction", report, ["model.onnx"], 0.1))
    result = CliRunner().invoke(cli, ["export", "whatever", "--out", str(out), "--triton-repo", str(tmp_path / "t2")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t2" / out.name / "1" / "model.onnx").exists()
