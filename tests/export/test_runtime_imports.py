"""The runtime package stands alone: at module level it imports the standard library, numpy,
tokenizers and its own modules (plus hypermerge's errors and file helpers), never torch,
transformers or the exporter; the exporter's old module paths still give the runtime's names."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import hypermerge.runtime

RUNTIME = Path(hypermerge.runtime.__file__).parent
ALLOWED_THIRD_PARTY = {"numpy", "tokenizers"}
ALLOWED_HYPERMERGE = ("hypermerge.runtime", "hypermerge.errors", "hypermerge._fs")


def _module_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text()).body:  # top-level statements only
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_runtime_modules_import_no_torch_and_nothing_from_the_exporter():
    files = sorted(RUNTIME.glob("*.py"))
    assert {f.stem for f in files} >= {"model", "tokenizer", "contract", "ort", "textstream", "adapter_scales",
                                       "weights_map"}
    bad = {}
    for path in files:
        for name in _module_level_imports(path):
            top = name.partition(".")[0]
            if top == "hypermerge":
                ok = name.startswith(ALLOWED_HYPERMERGE)
            else:
                ok = top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names or top == "__future__"
            if not ok:
                bad.setdefault(path.name, []).append(name)
    assert bad == {}


def test_old_import_paths_give_the_runtime_objects():
    from hypermerge.export import adapter_inputs, ort, runtime, tasks, textstream, weights_map
    from hypermerge.runtime import adapter_scales, contract, model
    from hypermerge.runtime import ort as runtime_ort
    from hypermerge.runtime import textstream as runtime_textstream
    from hypermerge.runtime import weights_map as runtime_weights_map

    assert runtime.OnnxModel is model.OnnxModel and runtime.decode is model.decode
    assert tasks.IOContract is contract.IOContract and tasks.contract_from_onnx is contract.contract_from_onnx
    assert ort.open_session is runtime_ort.open_session
    assert textstream.TextStream is runtime_textstream.TextStream
    assert weights_map.WeightsMap is runtime_weights_map.WeightsMap
    assert weights_map.read_weights_map is runtime_weights_map.read_weights_map
    assert adapter_inputs.scales_from_adapter is adapter_scales.scales_from_adapter
    assert adapter_inputs.read_layout is adapter_scales.read_layout
    import hypermerge as hm

    assert hm.OnnxModel is model.OnnxModel and hm.export.OnnxModel is model.OnnxModel
