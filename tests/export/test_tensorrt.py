"""The TensorRT path. Without TensorRT here, the construction logic (profiles, flags, timing cache,
engine and cache files, parser errors) runs against a stand-in module with the attribute names of
TensorRT 10's Python API; the real-engine tests are marked ``trt``."""

from __future__ import annotations

import sys
import types

import pytest

import hypermerge as hm
from hypermerge.export import tensorrt as trt_mod
from hypermerge.export.tasks import IOContract, past_names, present_names
from tests.helpers.common import save_tiny

CAUSAL = IOContract("causal-lm", ("input_ids", "attention_mask", "position_ids", *past_names(2)),
                    ("logits", *present_names(2)), num_layers=2, kv_heads=3, head_dim=64)
ENCODER = IOContract("feature-extraction", ("input_ids", "attention_mask", "token_type_ids"), ("last_hidden_state",))


class _Flag:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def fake_tensorrt(*, parse_ok: bool = True, engine: bytes | None = b"ENGINE", bf16: bool = True):
    """A stand-in for ``tensorrt`` that records what the builder was asked to do."""
    calls: dict = {"flags": [], "shapes": {}, "profiles": 0, "cache_in": None}

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timed"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            calls["flags"].append(flag.name)

        def add_optimization_profile(self, profile):
            calls["profiles"] += 1

        def create_timing_cache(self, data):
            calls["cache_in"] = bytes(data)
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["ignore_mismatch"] = ignore_mismatch
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, low, opt, high):
            calls["shapes"][name] = (tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return engine

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"] = path
            return parse_ok

        def get_error(self, index):
            return "In node 7 (importFoo): UNSUPPORTED_NODE: Foo"

    flags = {name: _Flag(name) for name in ("FP16", "REFIT", *(("BF16",) if bf16 else ()))}
    module = types.SimpleNamespace(
        __version__="10.fake", Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=Builder, OnnxParser=OnnxParser, BuilderFlag=types.SimpleNamespace(**flags),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))
    return module, calls


def test_parse_shapes():
    shapes = trt_mod.parse_shapes("1x16:8x64:32x128", "feature-extraction")
    assert (shapes.min.batch, shapes.opt.seq, shapes.max.batch, shapes.max.past) == (1, 64, 32, 0)
    causal = trt_mod.parse_shapes(None, "causal-lm")
    assert causal.min.past == 0 and causal.max.past >= causal.opt.past
    assert trt_mod.parse_shapes("1X1X0:2x1x64:4x128x512", "causal-lm").max.past == 512
    for bad in ("1x16:8x64", "1x16:8x64:4x128", "a:b:c", "1x16x0:8x64x0:32x128x0", "0x1:1x1:1x1"):
        with pytest.raises(hm.ConfigError, match="--shapes"):
            trt_mod.parse_shapes(bad, "feature-extraction")
    with pytest.raises(hm.ConfigError, match="past"):
        trt_mod.parse_shapes("1x1x64:1x1x32:4x8x128", "causal-lm")


def test_profile_shapes_cover_every_input():
    shapes = trt_mod.parse_shapes("1x1x0:2x1x100:4x16x200", "causal-lm")
    profile = trt_mod.profile_shapes(CAUSAL, shapes)
    assert set(profile) == set(CAUSAL.inputs)
    assert profile["input_ids"] == ((1, 1), (2, 1), (4, 16))
    assert profile["attention_mask"] == ((1, 1), (2, 101), (4, 216))  # past + new
    assert profile["past_value_1"] == ((1, 3, 0, 64), (2, 3, 100, 64), (4, 3, 200, 64))
    encoder = trt_mod.profile_shapes(ENCODER, trt_mod.parse_shapes("1x8:8x64:16x128", "feature-extraction"))
    assert encoder["token_type_ids"] == encoder["attention_mask"] == ((1, 8), (8, 64), (16, 128))


def test_builder_flags():
    trt, _ = fake_tensorrt()
    assert [f.name for f in trt_mod.builder_flags(trt, "fp32")] == ["REFIT"]
    assert [f.name for f in trt_mod.builder_flags(trt, "fp16")] == ["REFIT", "FP16"]
    assert [f.name for f in trt_mod.builder_flags(trt, "bf16")] == ["REFIT", "BF16"]
    with pytest.raises(hm.ConfigError, match="precision"):
        trt_mod.builder_flags(trt, "int4")
    old, _ = fake_tensorrt(bf16=False)
    with pytest.raises(hm.BackendUnavailableError, match="BF16"):
        trt_mod.builder_flags(old, "bf16")


def test_build_engine_writes_engine_and_keeps_the_timing_cache(tmp_path):
    trt, calls = fake_tensorrt()
    shapes = trt_mod.parse_shapes("1x1x0:1x1x32:4x64x256", "causal-lm")
    section = trt_mod.build_engine(trt, tmp_path / "model.onnx", tmp_path, CAUSAL, shapes, "fp16", workspace_gib=1)
    assert (tmp_path / "model.engine").read_bytes() == b"ENGINE"
    assert (tmp_path / "timing.cache").read_bytes() == b"+timed"
    assert calls["flags"] == ["REFIT", "FP16"] and calls["profiles"] == 1 and calls["cache_in"] == b""
    assert calls["workspace"] == ("WORKSPACE", 2**30) and calls["network_flags"] == 0
    assert calls["parsed"] == str(tmp_path / "model.onnx")  # from the file: external data resolves
    assert calls["shapes"]["past_key_0"] == ((1, 3, 0, 64), (1, 3, 32, 64), (4, 3, 256, 64))
    assert section["precision"] == "fp16" and section["flags"] == ["REFIT", "FP16"]
    assert section["profile"]["max"] == {"batch": 4, "seq": 64, "past": 256}
    # a rebuild starts from the kept cache
    trt_mod.build_engine(trt, tmp_path / "model.onnx", tmp_path, CAUSAL, shapes, "fp16")
    assert calls["cache_in"] == b"+timed"


def test_parser_and_builder_failures_are_export_errors(tmp_path):
    trt, _ = fake_tensorrt(parse_ok=False)
    shapes = trt_mod.parse_shapes(None, "feature-extraction")
    with pytest.raises(hm.ExportError, match="UNSUPPORTED_NODE"):
        trt_mod.build_engine(trt, tmp_path / "model.onnx", tmp_path, ENCODER, shapes, "fp32")
    trt, _ = fake_tensorrt(engine=None)
    with pytest.raises(hm.ExportError, match="no engine"):
        trt_mod.build_engine(trt, tmp_path / "model.onnx", tmp_path, ENCODER, shapes, "fp32")
    assert not (tmp_path / "model.engine").exists()


def test_require_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(hm.BackendUnavailableError, match="pip install") as info:
        trt_mod.require_tensorrt()
    assert "\n" not in str(info.value)
    fake, _ = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(hm.BackendUnavailableError, match="CUDA GPU"):
        trt_mod.require_tensorrt()


@pytest.mark.trt
@pytest.mark.parametrize("arch,precision", [("bert", "fp16"), ("llama", "fp16"), ("llama", "bf16")])
def test_real_engine_parity(tmp_path, arch, precision):
    source = save_tiny(arch, tmp_path / "source")
    result = hm.export_model(source, tmp_path / "out", trt=True, precision=precision, batch=2, seq=8, iters=5,
                             progress=False)
    trt = result.report["tensorrt"]
    assert trt["parity"]["passed"] and (result.out / "model.engine").exists() and (result.out / "timing.cache").exists()
    assert "REFIT" in trt["flags"] and "tensorrt" in result.report["latency"]
    assert hm.verify_export(result.out, iters=3, progress=False)["tensorrt"]["reverified"] == "yes"


# -- the stand-ins and hypermerge's TensorRT code against the real API (tensorrt-stubs 10.13) ------
def _stub_index():
    from tests.helpers.trt_api import StubIndex

    return StubIndex.load()


def _refit_stand_in():
    """The patch tests' refit stand-in module."""
    from tests.helpers.trt_stand_in import fake_tensorrt

    return fake_tensorrt(["w"])[0]


def test_every_name_the_stand_ins_offer_exists_in_tensorrt():
    from tests.helpers.trt_api import stand_in_problems

    index = _stub_index()
    for stand_in in (fake_tensorrt()[0], _refit_stand_in()):
        problems, checked = stand_in_problems(stand_in, index)
        assert problems == [], problems
        assert checked >= 8  # the check walked the stand-in (module names, classes, returned classes)


def test_every_trt_use_in_hypermerge_exists_in_tensorrt():
    from pathlib import Path

    from tests.helpers.trt_api import package_problems

    index = _stub_index()
    root = Path(hm.__file__).parent
    uses = []
    for path in (root / "export" / "tensorrt.py", root / "patch" / "refit.py"):
        problems, seen = package_problems(path.read_text(), index)
        assert problems == [], (path.name, problems)
        uses += seen
    # the walk reached the objects TensorRT hands back, not just the module's names
    for expected in ("IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.set_timing_cache", "ITimingCache.serialize",
                     "IOptimizationProfile.set_shape", "OnnxParser.parse_from_file", "ICudaEngine.get_tensor_mode",
                     "IExecutionContext.execute_async_v3", "Refitter.set_named_weights", "Refitter.refit_cuda_engine",
                     "BuilderFlag.BF16", "Logger.WARNING", "tensorrt.nptype"):
        assert expected in uses, expected


def test_a_renamed_stand_in_attribute_or_api_call_fails_the_check():
    from tests.helpers.trt_api import package_problems, stand_in_problems

    index = _stub_index()
    module, _ = fake_tensorrt()
    config_cls = type(module.Builder(None).create_builder_config())
    config_cls.set_memory_pool_limt = config_cls.set_memory_pool_limit  # a misspelt stand-in method
    del config_cls.set_memory_pool_limit
    module.BuilderFlag.REFITTABLE = module.BuilderFlag.REFIT
    problems, _ = stand_in_problems(module, index)
    assert "IBuilderConfig.set_memory_pool_limt" in problems and "BuilderFlag.REFITTABLE" in problems
    from pathlib import Path

    source = (Path(hm.__file__).parent / "patch" / "refit.py").read_text()
    problems, _ = package_problems(source.replace("refitter.set_named_weights", "refitter.set_named_weight"), index)
    assert problems == ["Refitter.set_named_weight"]
    problems, _ = package_problems("def f(trt):\n    c = trt.Builder(None).create_builder_config()\n"
                                   "    c.set_timing_cache(None, ignore_mismatches=False)\n", index)
    assert problems == ["IBuilderConfig.set_timing_cache(... ignore_mismatches=...)"]
