"""The fold's output shards: which tensors go in which file, and writing them one tensor at a time.

Every output tensor's dtype, shape and operation are known before a byte is written, so each
shard's header goes first and the tensors follow in header order: a copied tensor moves file to
file in the kernel, any other is produced by its operation into memory and written at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from hypermerge.adapters.checkpoint import AdapterCheckpoint
from hypermerge.errors import CheckpointError
from hypermerge.fold.hfdir import SINGLE_FILE, BaseCheckpoint
from hypermerge.fold.operations import CastTensor, CopyTensor, FoldBias, FoldWeight, SaveFullTensor
from hypermerge.fold.plan import FoldPlan
from hypermerge.fold.safetensors_io import (
    CASTABLE,
    ITEMSIZE,
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    OutputTensor,
    ShardWriter,
    TensorEntry,
    layout_order,
    read_tensor,
    tensor_bytes,
)


@dataclasses.dataclass
class OutputShard:
    """One output file and its tensors, in the order their bytes follow the header."""

    name: str
    tensors: list[OutputTensor]


def layout_shards(checkpoint: AdapterCheckpoint, base: BaseCheckpoint, plan: FoldPlan,
                  out_dtype: torch.dtype | None, max_shard_size: int | None) -> list[OutputShard]:
    """Every output tensor with its dtype and operation, assigned to shard files.

    Args:
        checkpoint: the adapter (for the tensors it adds).
        base: the base checkpoint's headers.
        plan: the fold plan.
        out_dtype: the output dtype of floating tensors; None keeps each tensor's.
        max_shard_size: the largest shard in bytes; None keeps the base's sharding.

    Returns:
        The shards, each with its tensors in layout order.

    Raises:
        CheckpointError: a tensor the fold must rewrite has a dtype this version does not know.
    """
    out_name = SAFETENSORS_DTYPES[out_dtype] if out_dtype is not None else None
    by_shard = {shard: [_base_output(plan, name, entry, out_name, shard)
                        for name, entry in base.headers[shard].entries.items()] for shard in base.shards}
    additions = _added_outputs(checkpoint, plan, out_name)
    if max_shard_size is None:
        return _base_layout(by_shard, additions)
    return _sized_layout(by_shard, additions, max_shard_size)


def _base_output(plan: FoldPlan, name: str, entry: TensorEntry, out_name: str | None, shard: Path) -> OutputTensor:
    """The output tensor made from one base tensor."""
    dtype = out_name if out_name is not None and entry.dtype in CASTABLE else entry.dtype
    operation = plan.operation(name, TORCH_DTYPES.get(dtype), cast=dtype != entry.dtype)
    if dtype not in ITEMSIZE:  # a dtype newer than this code: copied as bytes, never computed on
        if not isinstance(operation, CopyTensor):
            raise CheckpointError(f"{name} has dtype {dtype}, which this version cannot rewrite",
                                  path=shard, hint="fold onto a base saved in float32, float16 or bfloat16")
        return OutputTensor(name, dtype, entry.shape, operation, nbytes=entry.nbytes)
    return OutputTensor(name, dtype, plan.resized.get(name, entry.shape), operation)


def _added_outputs(checkpoint: AdapterCheckpoint, plan: FoldPlan, out_name: str | None) -> list[OutputTensor]:
    """The tensors the adapter adds (trained in full, not in the base), in its dtype or ``out_name``."""
    additions = []
    full = checkpoint.full_tensors() if plan.additions else {}
    for name, source in plan.additions.items():
        tensor = full[source]
        dtype = SAFETENSORS_DTYPES[tensor.dtype]
        if out_name is not None and dtype in CASTABLE:
            dtype = out_name
        operation = SaveFullTensor(name, source, TORCH_DTYPES[dtype])
        additions.append(OutputTensor(name, dtype, tuple(tensor.shape), operation))
    return additions


def _base_layout(by_shard: dict[Path, list[OutputTensor]], additions: list[OutputTensor]) -> list[OutputShard]:
    """The base's own sharding; additions go into the last shard."""
    shards = [OutputShard(shard.name, list(tensors)) for shard, tensors in by_shard.items()]
    shards[-1].tensors.extend(additions)
    return [OutputShard(s.name, layout_order(s.tensors)) for s in shards]


def _sized_layout(by_shard: dict[Path, list[OutputTensor]], additions: list[OutputTensor],
                  max_shard_size: int) -> list[OutputShard]:
    """Greedy by size: a new shard whenever the next tensor would pass ``max_shard_size``."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    ordered = [t for tensors in by_shard.values() for t in layout_order(tensors)] + additions
    for tensor in ordered:
        if groups[-1] and size + tensor.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [OutputShard(SINGLE_FILE, layout_order(groups[0]))]
    count = len(groups)
    return [OutputShard(f"model-{i + 1:05d}-of-{count:05d}.safetensors", layout_order(g))
            for i, g in enumerate(groups)]


class _BaseReader:
    """The base's tensors, read on demand (a few shards kept open) into one reused buffer."""

    def __init__(self, base: BaseCheckpoint, buffer_bytes: int, keep: int = 4):
        self.base = base
        self._handles: dict[Path, BinaryIO] = {}
        self._keep = keep
        # One read buffer, as large as the largest tensor read, reused for every read: fresh
        # buffers would cost page faults each time and fragment the heap.
        self._buffer = torch.empty(buffer_bytes, dtype=torch.uint8)

    def path(self, name: str) -> Path | None:
        return self.base.shard_of.get(name)

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor: a view of the buffer, valid until the next read."""
        path = self.base.shard_of[name]
        return read_tensor(self._file(path), self.base.entry(name), path, buffer=self._buffer)

    def copy_into(self, writer: ShardWriter, name: str, progress: Callable[[int], None]) -> None:
        """Append the stored tensor's bytes to ``writer``, file to file."""
        path, entry = self.base.shard_of[name], self.base.entry(name)
        writer.copy_from(self._file(path), entry.begin, entry.nbytes, path, progress)

    def _file(self, path: Path) -> BinaryIO:
        handle = self._handles.get(path)
        if handle is None:
            if len(self._handles) >= self._keep:
                oldest = next(iter(self._handles))
                self._handles.pop(oldest).close()
            try:
                handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise CheckpointError(f"cannot open the weights ({exc.strerror})", path=path,
                                      hint="check the base model directory") from exc
            self._handles[path] = handle
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def write_shards(checkpoint: AdapterCheckpoint, base: BaseCheckpoint, shards: list[OutputShard], tmp: Path,
                 metadata: dict[str, str], progress: Callable[[int], None],
                 on_tensor: Callable[[str], None] | None = None) -> None:
    """Write every output shard into ``tmp``: header first, then each tensor's bytes in header order.

    One thread does everything, in order. (A writer thread overlapping writes with folding was
    measured on the 2-core benchmark machine: no faster, and one more tensor resident.)

    Args:
        checkpoint: the adapter the operations fold in.
        base: the base checkpoint the operations read.
        shards: the layout (``layout_shards``).
        tmp: the output directory.
        metadata: the safetensors ``__metadata__`` of every shard.
        progress: called with each number of bytes written.
        on_tensor: called with each tensor's name once it is written.

    Raises:
        CheckpointError, AdapterMismatchError: from reading or producing a tensor.
        HypermergeError: a disk error while writing.
    """
    computed = (t for s in shards for t in s.tensors if isinstance(t.produce, (FoldWeight, FoldBias, CastTensor)))
    reader = _BaseReader(base, max((base.entry(t.name).nbytes for t in computed), default=0))
    try:
        for shard in shards:
            _write_shard(tmp / shard.name, shard.tensors, metadata, checkpoint, reader, progress, on_tensor)
    finally:
        reader.close()


def _write_shard(path: Path, tensors: list[OutputTensor], metadata: dict[str, str], checkpoint: AdapterCheckpoint,
                 reader: _BaseReader, progress: Callable[[int], None],
                 on_tensor: Callable[[str], None] | None) -> None:
    writer = ShardWriter(path, tensors, metadata)
    try:
        for item in tensors:
            writer.begin(item.name)
            _write_tensor(writer, item, checkpoint, reader, progress)
            if on_tensor is not None:
                on_tensor(item.name)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _write_tensor(writer: ShardWriter, item: OutputTensor, checkpoint: AdapterCheckpoint, reader: _BaseReader,
                  progress: Callable[[int], None]) -> None:
    operation = item.produce
    if isinstance(operation, CopyTensor):  # never enters this process's memory
        reader.copy_into(writer, item.name, progress)
        return
    tensor = operation.produce(reader.read, checkpoint, source=reader.path(item.name))
    # Written before the next read reuses the buffer, so a fold that returns its input unchanged
    # is still written correctly.
    writer.write(tensor_bytes(tensor.contiguous()))
    progress(item.nbytes)
