"""``hypermerge patch --trt``: new weights into a built TensorRT engine with ``trt.Refitter``.

``hypermerge export --trt`` always builds with ``BuilderFlag.REFIT``, so an engine's weights can be
replaced without a rebuild (minutes of kernel timing for an LLM). TensorRT's ONNX parser names
every weight after its ONNX initializer, so the initializers a patch rewrote are exactly the names
to refit:

    runtime.deserialize_cuda_engine -> trt.Refitter(engine, logger)
    -> get_all_weights() (what can be refitted) -> set_named_weights(initializer, trt.Weights(array))
    -> get_missing_weights() (weights TensorRT fused with the changed ones: supplied unchanged)
    -> refit_cuda_engine() -> engine.serialize() -> NEW_DIR/model.engine

TensorRT documents that a refit can lose a GEMM's bias when the bias was fused at build time, so
the caller checks the refitted engine's parity again.

Written against TensorRT 10's Python API. The logic takes the ``tensorrt`` module as an argument
and is unit-tested with a stand-in (``tests/patch/test_refit.py``); it has **not run on a real
TensorRT** (no GPU here), the ``trt``-marked test is the one to run first on a GPU machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hypermerge.errors import ExportError


def refit_engine(trt, engine_path: Path, out_path: Path, changed: Sequence[str],
                 initializer: Callable[[str], np.ndarray]) -> dict:
    """Refit the engine at ``engine_path`` with new values of ``changed`` and write ``out_path``.

    Args:
        trt: the ``tensorrt`` module (a stand-in in tests).
        engine_path: a serialized engine built with the REFIT flag.
        out_path: where the refitted engine is written.
        changed: the initializer names whose values changed.
        initializer: name -> the patched model's values (also used for the weights TensorRT asks
            to be supplied again with them).

    Returns:
        The ``tensorrt.refit`` section of the report.

    Raises:
        ExportError: the engine cannot be loaded or is not refittable, a changed weight is not
            refittable (TensorRT folded it into another constant), or the refit fails.
    """
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)  # held until the engine is serialized: TensorRT wants it to outlive the engine
    engine = load_refittable(runtime, engine_path)
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    check_refittable(changed, refittable, engine_path)
    supplier = _Supplier(trt, refitter, initializer, engine_path)
    for name in changed:
        supplier.supply(name)
    resupplied = supplier.resupply_missing(changed)
    finish_refit(refitter, engine_path)
    Path(out_path).write_bytes(bytes(engine.serialize()))
    supplier.keep.clear()  # only now may the arrays go
    return {"method": "trt.Refitter (set_named_weights, refit_cuda_engine)", "refitted": len(changed),
            "resupplied_unchanged": resupplied, "refittable_weights": len(refittable),
            "seconds": round(time.perf_counter() - start, 2)}


def load_refittable(runtime, engine_path: Path):
    """The deserialized engine.

    Raises:
        ExportError: TensorRT cannot load it, or it was built without REFIT.
    """
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise ExportError("TensorRT cannot load the engine", path=engine_path,
                          hint="engines are tied to a GPU and TensorRT version: rebuild with hypermerge export --trt")
    if not getattr(engine, "refittable", True):
        raise ExportError("the engine was built without the REFIT flag", path=engine_path,
                          hint="rebuild it with hypermerge export --trt (which always sets REFIT)")
    return engine


def check_refittable(changed: Sequence[str], refittable: set[str], engine_path: Path) -> None:
    """Raise ExportError naming the first changed initializer the engine cannot refit."""
    missing_in_engine = [name for name in changed if name not in refittable]
    if missing_in_engine:
        raise ExportError(f"the engine has no refittable weight {missing_in_engine[0]} "
                          f"({len(missing_in_engine)} of {len(changed)} changed initializers): TensorRT folded it "
                          "into another constant when it built the engine", path=engine_path,
                          hint="rebuild the engine: hypermerge export --trt on the patched directory's model")


class _Supplier:
    """Hands the refitter new weights, keeping each array alive until the refit is done
    (``trt.Weights`` does not copy)."""

    def __init__(self, trt, refitter, initializer: Callable[[str], np.ndarray], engine_path: Path):
        self.trt, self.refitter, self.initializer, self.engine_path = trt, refitter, initializer, engine_path
        self.keep: list[np.ndarray] = []

    def supply(self, name: str) -> None:
        array = np.ascontiguousarray(self.initializer(name))
        refitter = self.refitter
        prototype = refitter.get_weights_prototype(name) if hasattr(refitter, "get_weights_prototype") else None
        if prototype is not None:
            if int(prototype.size) != array.size:
                raise ExportError(f"TensorRT holds {prototype.size} values for {name}, the patched model {array.size}",
                                  path=self.engine_path, hint="rebuild the engine: hypermerge export --trt")
            array = np.ascontiguousarray(array.astype(self.trt.nptype(prototype.dtype), copy=False))
        self.keep.append(array)
        if not refitter.set_named_weights(name, self.trt.Weights(array)):
            raise ExportError(f"TensorRT refused the new values of {name}", path=self.engine_path,
                              hint="rebuild the engine: hypermerge export --trt")

    def resupply_missing(self, changed: Sequence[str]) -> list[str]:
        """Supply, unchanged, the weights TensorRT fused with the changed ones; returns their names."""
        resupplied = [name for name in self.refitter.get_missing_weights() if name not in changed]
        for name in resupplied:
            try:
                self.supply(name)
            except KeyError:
                raise ExportError(f"TensorRT needs {name} again to refit, and the ONNX model has no such "
                                  "initializer", path=self.engine_path,
                                  hint="rebuild the engine: hypermerge export --trt") from None
        return resupplied


def finish_refit(refitter, engine_path: Path) -> None:
    """Refit the engine in place.

    Raises:
        ExportError: weights are still missing, or TensorRT's refit fails.
    """
    still = list(refitter.get_missing_weights())
    if still:
        raise ExportError(f"TensorRT still misses {len(still)} weights after the refit (first: {still[0]})",
                          path=engine_path, hint="rebuild the engine: hypermerge export --trt")
    if not refitter.refit_cuda_engine():
        raise ExportError("TensorRT's refit failed (its log above says why)", path=engine_path,
                          hint="rebuild the engine: hypermerge export --trt")
