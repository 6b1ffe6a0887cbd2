"""Renaming and deleting an ONNX model together with its external data file (named inside the model)."""

from __future__ import annotations

import os
from pathlib import Path


def external_data_files(path: Path) -> list[Path]:
    """The external data files an ONNX model names (none for weights inside the protobuf)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return [path.parent / name for name in sorted(locations)]


def move_onnx(src: Path, dst: Path) -> None:
    """Rename an ONNX model; its external data file (named inside the model) is renamed with it."""
    data = external_data_files(src)
    if not data:
        os.replace(src, dst)
        return
    import onnx

    model = onnx.load(str(src))
    dst.unlink(missing_ok=True)
    for path in external_data_files(dst.parent / dst.name) if dst.exists() else []:
        path.unlink(missing_ok=True)
    Path(f"{dst}.data").unlink(missing_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{dst.name}.data")
    src.unlink()
    for path in data:
        path.unlink(missing_ok=True)


def remove_onnx(path: Path) -> None:
    """Delete an ONNX model and its external data."""
    if path.exists():
        for data in external_data_files(path):
            data.unlink(missing_ok=True)
        path.unlink()


def opset_of(path: Path) -> int | None:
    """The default-domain opset an ONNX model was written for (None if it names none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
