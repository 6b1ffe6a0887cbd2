"""One certificate from adapter to engine: export of a folded model carries the chain (adapter,
base, folded weights, engine) and an end-to-end check of base + adapter unfolded in PyTorch
against the engine; ``hypermerge verify`` names the link that broke. One test per link tampers
it and sees verify fail there (and restores it)."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.export.certificate import CertificateError
from tests.helpers.common import load_tiny, perturb_adapter, save_tiny
from tests.helpers.export import FAST


def make_chain(root, arch: str) -> dict:
    base = save_tiny(arch, root / "base")
    model = hm.inject(load_tiny(arch, base), hm.LoRAConfig(r=4, alpha=8))
    perturb_adapter(model)
    adapter = hm.save_adapter(model, root / "adapter", base_model=base)
    hm.fold_checkpoint(adapter, root / "folded", progress=False)
    hm.export_model(root / "folded", root / "onnx", new_tokens=8, **FAST)
    return {"root": root, "base": base, "adapter": adapter, "folded": root / "folded", "onnx": root / "onnx"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny Bert classifier's chain (an encoder: the quickest export that has every link)."""
    return make_chain(tmp_path_factory.mktemp("certificate"), "bert")


def _report(export_dir):
    return json.loads((export_dir / "report.json").read_text())


def test_the_export_report_carries_the_whole_chain(chain):
    certificate = _report(chain["onnx"])["certificate"]
    assert certificate["end_to_end"]["passed"] is True and certificate["end_to_end"]["greedy_decode_match"] is None
    markdown = (chain["onnx"] / "report.md").read_text()
    assert "## Certificate, adapter -> base -> folded weights -> engine: PASSED" in markdown
    assert "5. end to end (base + adapter unfolded in PyTorch vs the engine): passed" in markdown


@pytest.mark.slow
def test_a_causal_lm_chain_decodes_token_for_token_end_to_end(tmp_path):
    chain = make_chain(tmp_path, "llama")
    certificate = _report(chain["onnx"])["certificate"]
    assert certificate["passed"] is True
    assert certificate["adapter"]["path"] == str(chain["adapter"].absolute())
    assert certificate["base"]["content_check"]["status"] == "same base"
    assert certificate["folded"]["weights_sha256"] == _report(chain["onnx"])["source"]["weights_sha256"]
    assert certificate["engine"]["parity_vs_folded"] is True
    e2e = certificate["end_to_end"]
    assert e2e["passed"] is True and e2e["greedy_decode_match"] is True  # token for token, unfolded adapter model
    assert "vs base+adapter (unfolded, PyTorch)" in e2e["backend"]
    assert "greedy decode identical" in (chain["onnx"] / "report.md").read_text()
    result = CliRunner().invoke(cli, ["verify", str(chain["onnx"]), "-q"])  # an intact chain verifies
    assert result.exit_code == 0, result.output


@contextlib.contextmanager
def _tampered(path):
    """Change one value of a safetensors file (or a byte of any other file) and restore it afterwards."""
    original = path.read_bytes()
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            key = sorted(k for k in tensors if "q_proj" in k or "query" in k)[0]
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] += 0.5
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            data = bytearray(original)
            data[-1] ^= 0x01
            path.write_bytes(bytes(data))
        yield
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize(("link", "file"), [
    ("adapter changed", ("adapter", "adapter_model.safetensors")),
    ("base changed", ("base", "model.safetensors")),
    ("folded weights changed", ("folded", "model.safetensors")),
    ("engine changed", ("onnx", "model.onnx.data")),
])
def test_verify_names_the_broken_link(chain, link, file):
    before = (chain["onnx"] / "report.json").read_bytes()
    target = chain[file[0]] / file[1]
    if not target.exists():  # a small model keeps its weights inside model.onnx
        target = chain["onnx"] / "model.onnx"
    with _tampered(target), pytest.raises(CertificateError, match=f"at the {link.split()[0]}.* link: {link}"):
        hm.verify_export(chain["onnx"], progress=False)
    assert (chain["onnx"] / "report.json").read_bytes() == before  # nothing rewritten
    hm.export.certificate.verify_links(chain["onnx"], json.loads(before))  # restored: every link holds again


def test_a_deleted_adapter_is_not_a_broken_link(chain, tmp_path):
    """Training artifacts get cleaned up: a link whose file is gone is reported, not failed."""
    from hypermerge.export.certificate import verify_links

    moved = chain["adapter"].rename(tmp_path / "adapter")
    try:
        certificate = verify_links(chain["onnx"], _report(chain["onnx"]))
    finally:
        moved.rename(chain["adapter"])
    assert certificate["rechecked"] == {"adapter": "adapter not reachable: not re-checked", "base": "base unchanged",
                                       "folded weights": "folded weights unchanged", "engine": "engine unchanged"}


def test_the_cli_says_the_broken_link_in_one_line(chain):
    with _tampered(chain["adapter"] / "adapter_model.safetensors"):
        result = CliRunner().invoke(cli, ["verify", str(chain["onnx"]), "-q"])
    lines = [line for line in result.output.strip().splitlines() if line]
    assert result.exit_code != 0 and len(lines) == 1
    assert "the certificate is broken at the adapter link: adapter changed" in lines[0]


@pytest.mark.slow
def test_the_end_to_end_check_fails_when_the_engine_is_not_the_adapters(chain, tmp_path):
    """The end-to-end link can fail: the adapter replaced by another one between fold and export."""
    folded = shutil.copytree(chain["folded"], tmp_path / "folded")
    adapter = shutil.copytree(chain["adapter"], tmp_path / "adapter")
    provenance = json.loads((folded / "hypermerge_fold.json").read_text())
    provenance["adapter"] = str(adapter)
    (folded / "hypermerge_fold.json").write_text(json.dumps(provenance))
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors = {k: v * 3 if k.endswith("lora_B") else v for k, v in tensors.items()}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(hm.ParityError, match="does not compute what the adapter model computes"):
        hm.export_model(folded, tmp_path / "onnx", new_tokens=4, **FAST)
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_patch_writes_the_same_chain(chain, tmp_path):
    model = hm.inject(load_tiny("bert", chain["base"]), hm.HyperAdaptConfig())
    perturb_adapter(model, seed=3, scale=0.05)
    adapter = hm.save_adapter(model, tmp_path / "adapter", base_model=chain["base"])
    base_export = tmp_path / "base-onnx"
    hm.export_model(chain["base"], base_export, verify=False, **FAST)
    hm.patch_export(base_export, adapter, tmp_path / "patched", new_tokens=4, progress=False)
    certificate = _report(tmp_path / "patched")["certificate"]
    assert certificate["passed"] is True and certificate["folded"] is None
    assert certificate["end_to_end"]["passed"] is True
    assert certificate["base"]["content_check"]["status"] == "same base"
    with _tampered(adapter / "adapter_model.safetensors"), pytest.raises(CertificateError, match="adapter changed"):
        hm.verify_export(tmp_path / "patched", progress=False)
