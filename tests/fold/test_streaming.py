"""The streaming fold engine: equal to the in-memory fold bit for bit, shards, dtypes, layout."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import hypermerge as hm
from hypermerge.fold.hfdir import open_base
from hypermerge.fold.safetensors_io import ITEMSIZE, parse_size, read_header
from tests.helpers.common import (
    ARCHITECTURES,
    TEST_CONFIGS,
    load_tiny,
    model_output,
    perturb_adapter,
    sample_inputs,
    save_tiny,
)

METHODS = sorted(hm.METHODS)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-bases")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHITECTURES}


def _adapter(arch, base, method, path, seed=0):
    model = hm.inject(load_tiny(arch, base), TEST_CONFIGS[method]())
    perturb_adapter(model, seed=seed)
    hm.save_adapter(model, path, base_model=base)
    return model


def _all_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_streaming_fold_equals_in_memory_fold_bit_for_bit(method, arch, bases, tmp_path):
    model = _adapter(arch, bases[arch], method, tmp_path / "adapter")
    result = hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "out", progress=False)
    assert result.folded == len(hm.adapter_layers(model)) and result.method == method
    in_memory = hm.fold_model(model).state_dict()
    streamed = _all_tensors(tmp_path / "out")
    base = _all_tensors(bases[arch])
    assert set(streamed) == set(base)
    for name, tensor in streamed.items():
        assert tensor.dtype == base[name].dtype
        assert torch.equal(tensor, in_memory[name]), name


def test_untouched_tensors_are_copied_byte_for_byte(bases, tmp_path):
    _adapter("llama", bases["llama"], "lora", tmp_path / "adapter")
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "out", progress=False)
    source, folded = read_header(bases["llama"] / "model.safetensors"), read_header(tmp_path / "out" / "model.safetensors")
    src_bytes, out_bytes = (bases["llama"] / "model.safetensors").read_bytes(), (tmp_path / "out" / "model.safetensors").read_bytes()
    untouched = [n for n in source.entries if "proj" not in n]
    assert untouched
    for name in untouched:
        a, b = source.entries[name], folded.entries[name]
        assert src_bytes[a.begin:a.end] == out_bytes[b.begin:b.end], name


def test_output_header_is_valid_aligned_and_keeps_metadata(bases, tmp_path):
    _adapter("gpt2", bases["gpt2"], "hyperadapt", tmp_path / "adapter")
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "out", progress=False, dtype="bfloat16")
    path = tmp_path / "out" / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0
    header = read_header(path)
    assert header.metadata == read_header(bases["gpt2"] / "model.safetensors").metadata
    previous_end = header.data_start
    for entry in header.entries.values():  # no holes, each tensor aligned to its element size
        assert entry.begin == previous_end and (entry.begin - header.data_start) % ITEMSIZE[entry.dtype] == 0
        previous_end = entry.end
    assert previous_end == len(raw)
    with safe_open(str(path), framework="pt") as handle:  # the reference reader agrees
        assert set(handle.keys()) == set(header.entries)


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_output_dtype_is_one_cast_of_the_float32_fold(dtype, torch_dtype, bases, tmp_path):
    model = _adapter("bert", bases["bert"], "ia3", tmp_path / "adapter")
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "out", progress=False, dtype=dtype)
    reference = hm.fold_model(model).state_dict()
    folded = _all_tensors(tmp_path / "out")
    base = _all_tensors(bases["bert"])
    for name, tensor in folded.items():
        if base[name].is_floating_point():
            assert tensor.dtype == torch_dtype
            assert torch.equal(tensor, reference[name].to(torch_dtype)), name
        else:  # position ids and the like pass through untouched
            assert torch.equal(tensor, base[name])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == dtype


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    base = save_tiny("llama", root / "base", max_shard_size="20KB")
    model = hm.inject(load_tiny("llama", base), hm.LoRAConfig(r=4, alpha=8))
    perturb_adapter(model)
    hm.save_adapter(model, root / "adapter", base_model=base)
    reference = model_output(model, sample_inputs())
    return root, base, reference


def test_multi_shard_base_keeps_its_sharding(sharded, tmp_path):
    root, base, reference = sharded
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 3
    result = hm.fold_checkpoint(root / "adapter", tmp_path / "out", progress=False)
    assert result.shards == len(shards)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == result.bytes_written == base_index["metadata"]["total_size"]
    for shard in shards:  # every shard lists exactly what the index puts in it
        assert set(read_header(tmp_path / "out" / shard).entries) == {
            n for n, s in index["weight_map"].items() if s == shard}
    folded = load_tiny("llama", tmp_path / "out")
    assert (model_output(folded, sample_inputs()) - reference).abs().max() < 1e-5


def test_max_shard_size_reshards_and_single_file_when_it_fits(sharded, tmp_path):
    root, base, reference = sharded
    result = hm.fold_checkpoint(root / "adapter", tmp_path / "resharded", progress=False, max_shard_size="50KB")
    index = json.loads((tmp_path / "resharded" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "resharded").glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) == result.shards > 1
    assert all(f.startswith("model-") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    for name in files:  # a shard exceeds the limit only when a single tensor does
        entries = read_header(tmp_path / "resharded" / name).entries.values()
        assert sum(e.nbytes for e in entries) <= 50_000 or len(entries) == 1
    one = hm.fold_checkpoint(root / "adapter", tmp_path / "one", progress=False, max_shard_size="1GB")
    assert one.shards == 1 and (tmp_path / "one" / "model.safetensors").exists()
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    expected = _all_tensors(tmp_path / "resharded")
    assert all(torch.equal(t, expected[n]) for n, t in _all_tensors(tmp_path / "one").items())
    for out in ("resharded", "one"):
        assert (model_output(load_tiny("llama", tmp_path / out), sample_inputs()) - reference).abs().max() < 1e-5


def test_model_files_are_copied_and_provenance_recorded(bases, tmp_path):
    base = tmp_path / "base"
    save_tiny("gpt2", base)
    (base / "tokenizer.json").write_text("{}")
    (base / "generation_config.json").write_text(json.dumps({"max_length": 5}))
    _adapter("gpt2", base, "dora", tmp_path / "adapter")
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "generation_config.json").read_text()) == {"max_length": 5}
    provenance = json.loads((out / "hypermerge_fold.json").read_text())
    assert provenance["method"] == "dora" and provenance["folded_weights"] == 8 and provenance["verify"] is None
    assert not list(tmp_path.glob("*hm-tmp*"))


def test_open_base_reads_headers_only(sharded):
    _, base, _ = sharded
    checkpoint = open_base(base)
    assert len(checkpoint.shards) > 3 and len(checkpoint.shapes) == len(checkpoint.shard_of)
    entry = checkpoint.entry("model.embed_tokens.weight")
    assert entry.nbytes == 128 * 32 * 4 and checkpoint.dtypes["model.embed_tokens.weight"] == "F32"


def test_parse_size():
    assert parse_size("200MB") == 200_000_000 and parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1.5 gb") == 1_500_000_000 and parse_size(1234) == 1234 and parse_size(None) is None
    for bad in ("lots", "0MB", "-3GB"):
        with pytest.raises(hm.ConfigError):
            parse_size(bad)


def test_verify_reports_and_refuses(bases, tmp_path):
    from hypermerge.fold.verify import verify_fold

    _adapter("bert", bases["bert"], "hyperadapt", tmp_path / "adapter")
    result = hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "out", progress=False, verify=True)
    assert result.verify["passed"] and result.verify["max_rel"] < 1e-5
    # The base itself is not the folded model: verify must refuse it.
    with pytest.raises(hm.ParityError, match="differs from the adapter model"):
        verify_fold(tmp_path / "adapter", bases["bert"], bases["bert"])
    # A tolerance the dtype cannot meet refuses, and leaves no output behind.
    with pytest.raises(hm.ParityError):
        hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "bf16", progress=False, dtype="bfloat16", verify=True,
                           tolerance=1e-7)
    assert not (tmp_path / "bf16").exists() and not list(tmp_path.glob("*hm-tmp*"))


def test_quantised_integer_and_unknown_dtypes_pass_through_a_cast(bases, tmp_path):
    from hypermerge.fold.safetensors_io import OutputTensor, encode_header

    base = tmp_path / "base"
    base.mkdir()
    for entry in bases["llama"].iterdir():
        if entry.name != "model.safetensors":
            (base / entry.name).write_bytes(entry.read_bytes())
    tensors = load_file(str(bases["llama"] / "model.safetensors"))
    tensors["extra.fp8"] = torch.randn(4, 8).to(torch.float8_e4m3fn)
    tensors["extra.int"] = torch.arange(6)
    # A dtype this version does not know (a newer safetensors, say): 5 opaque bytes.
    layout = [OutputTensor(n, {torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64"}[t.dtype],
                           tuple(t.shape), t) for n, t in tensors.items()]
    layout.append(OutputTensor("extra.future", "F3_FUTURE", (10,), None, nbytes=5))
    with open(base / "model.safetensors", "wb") as handle:
        handle.write(encode_header(layout, {"format": "pt"}))
        for item in layout:
            handle.write(b"\x01\x02\x03\x04\x05" if item.produce is None else
                         item.produce.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    _adapter("llama", bases["llama"], "lora", tmp_path / "adapter")
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "out", base=base, progress=False, dtype="float16")
    header = read_header(tmp_path / "out" / "model.safetensors")
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    source = read_header(base / "model.safetensors")
    source_raw = (base / "model.safetensors").read_bytes()
    for name in ("extra.fp8", "extra.int", "extra.future"):
        a, b = source.entries[name], header.entries[name]
        assert a.dtype == b.dtype and raw[b.begin:b.end] == source_raw[a.begin:a.end], name
    assert header.entries["model.layers.0.self_attn.q_proj.weight"].dtype == "F16"
    assert header.entries["model.norm.weight"].dtype == "F16"
