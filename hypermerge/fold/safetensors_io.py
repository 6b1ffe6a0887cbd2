"""safetensors, one tensor at a time: header parsing, byte-range reads, and shard writing.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets
relative to the end of the header), then the tensor bytes. Knowing that, the fold engine never
needs a whole file in memory: it reads one tensor's byte range into a buffer, and writes an
output file by emitting its header first (every size is known up front) and then each tensor's
bytes in header order. Untouched tensors are copied file to file by the kernel
(``copy_file_range``) in bounded chunks, so they never enter this process's memory.

Plain reads are used instead of ``mmap`` on purpose: pages of a mapped file that have been
touched count towards the process's resident set, so mapping a 10 GB checkpoint and walking
through it makes RSS climb to 10 GB even though the kernel could drop those pages at any time.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from hypermerge.errors import CheckpointError, ConfigError, HypermergeError

# safetensors dtype name -> bytes per element. Names not listed here are passed through
# untouched (their byte ranges are still checked against the header).
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # unsigned types beyond uint8 arrived in torch 2.3
        TORCH_DTYPES[_name] = getattr(torch, _attr)
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
# Floating types an output --dtype converts and a fold may write. float8 weights are quantised
# (their scales live in other tensors), so they are neither cast nor folded.
CASTABLE = {"F64", "F32", "F16", "BF16"}

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
COPY_CHUNK = 64 << 20  # bytes per copy_file_range call (in the kernel: no process memory)
FALLBACK_CHUNK = 8 << 20  # bytes per read + write where copy_file_range is unavailable
_MAX_IO = 1 << 30  # stay below Linux's ~2 GiB cap on one read()/write()
_DAMAGED = "the file is truncated or of another format; re-save or re-download it"


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are and what they mean.

    ``begin`` and ``end`` are absolute file offsets (the header is already accounted for).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: Path
    entries: dict[str, TensorEntry]  # in file order
    metadata: dict[str, str] | None
    data_start: int


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header of a safetensors file without reading any tensor data.

    Every tensor's byte range must lie inside the file and match its dtype and shape, so a
    truncated or damaged file is refused here, before any output is written.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The header: entries in file order with absolute byte offsets, and the metadata.

    Raises:
        CheckpointError: the file is missing, not safetensors, damaged or truncated.
    """
    size, length, raw = _raw_header(path)
    document = _header_document(raw, path)
    data_start = 8 + length
    metadata = document.pop("__metadata__", None)
    entries = {name: _entry(name, info, data_start, size, path) for name, info in document.items()}
    ordered = dict(sorted(entries.items(), key=lambda item: item[1].begin))
    return SafetensorsHeader(path, ordered, metadata if isinstance(metadata, dict) else None, data_start)


def _raw_header(path: Path) -> tuple[int, int, bytes]:
    """The file's size, its header's length and JSON bytes; the length is checked against the size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"not a safetensors file ({size} bytes, too short for a header)",
                                      path=path, hint=_DAMAGED)
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(f"not a safetensors file (header length {length} does not fit a "
                                      f"{size}-byte file)", path=path, hint=_DAMAGED)
            return size, length, handle.read(length)
    except FileNotFoundError:
        raise CheckpointError("weight file not found", path=path,
                              hint="the download or copy is incomplete; copy the model again") from None
    except IsADirectoryError:
        raise CheckpointError("expected a safetensors file, found a directory", path=path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read the file ({exc.strerror})", path=path,
                              hint="check permissions and the disk") from exc


def _header_document(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError("not a safetensors file (its header is not JSON)", path=path, hint=_DAMAGED) from None
    if not isinstance(document, dict):
        raise CheckpointError("not a safetensors file (its header is not a JSON object)", path=path, hint=_DAMAGED)
    return document


def _entry(name: str, info: Any, data_start: int, size: int, path: Path) -> TensorEntry:
    """One header entry, its byte range checked against its dtype and shape and the file's size."""
    try:
        dtype = str(info["dtype"])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"damaged safetensors header (entry {name!r})", path=path, hint=_DAMAGED) from None
    if any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise CheckpointError(f"damaged safetensors header (entry {name!r})", path=path, hint=_DAMAGED)
    itemsize = ITEMSIZE.get(dtype)
    if itemsize is not None and end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(f"damaged safetensors header: {name} should take "
                              f"{math.prod(shape) * itemsize} bytes, its range has {end - begin}",
                              path=path, hint=_DAMAGED)
    if data_start + end > size:
        raise CheckpointError(f"truncated safetensors file: {name} ends at byte {data_start + end} "
                              f"but the file has {size}", path=path, hint=_DAMAGED)
    return TensorEntry(name, dtype, shape, data_start + begin, data_start + end)


def read_tensor(handle: BinaryIO, entry: TensorEntry, path: Path, buffer: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Read one tensor's bytes with positional reads (no mmap).

    Args:
        handle: the open file.
        entry: where the tensor is.
        path: the file's path, for messages.
        buffer: a uint8 tensor of at least ``entry.nbytes`` to read into (the result is then a
            view of it, valid until the buffer is reused); a fresh one when None.

    Returns:
        The tensor, with the entry's dtype and shape.

    Raises:
        CheckpointError: a read failed or came back short (the file changed or is damaged).
    """
    dtype = TORCH_DTYPES.get(entry.dtype)
    if dtype is None:
        raise CheckpointError(f"{entry.name} has dtype {entry.dtype}, which this version cannot compute with",
                              path=path, hint="fold onto a base saved in float32, float16 or bfloat16")
    if buffer is None or buffer.numel() < entry.nbytes:
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    buffer = buffer[: entry.nbytes]
    view = memoryview(buffer.numpy())
    done = 0
    fd = handle.fileno()
    try:
        while done < entry.nbytes:
            count = _pread_into(fd, handle, view[done: done + _MAX_IO], entry.begin + done)
            if count == 0:
                raise CheckpointError(f"{entry.name}: the file ended early", path=path,
                                      hint="the file is truncated or was modified during the fold; copy it again")
            done += count
    except OSError as exc:
        raise CheckpointError(f"cannot read {entry.name} ({exc.strerror})", path=path,
                              hint="check the disk holding the base model") from exc
    return buffer.view(dtype).reshape(entry.shape)


def _pread_into(fd: int, handle: BinaryIO, view: memoryview, offset: int) -> int:
    """Read into ``view`` at ``offset`` without moving the file position (where the OS can)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    handle.seek(offset)  # platforms without preadv (Windows): seek + readinto
    return handle.readinto(view)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (little-endian, like safetensors)."""
    flat = tensor.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy())


def parse_size(text: str | int | None) -> int | None:
    """``"200MB"`` -> 200_000_000, ``"2GiB"`` -> 2 * 1024**3, an int as bytes, None as None.

    Args:
        text: a size with an optional unit (B, KB, MB, GB, TB decimal; KiB... binary).

    Returns:
        The size in bytes, or None.

    Raises:
        ConfigError: the text is not a size.
    """
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text <= 0:
            raise ConfigError(f"a shard size must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if match is None:
        raise ConfigError(f"cannot read {text!r} as a size", hint="write it like 500MB, 2GB or 1GiB")
    number, unit = float(match.group(1)), match.group(2)
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    prefix = unit.rstrip("B").rstrip("I")
    base = 1024 if "I" in unit else 1000
    size = int(number * base ** powers[prefix])
    if size <= 0:
        raise ConfigError(f"a shard size must be positive, got {text!r}")
    return size


@dataclasses.dataclass
class OutputTensor:
    """One tensor of an output shard: its name, output dtype and shape, and how to make it.

    ``nbytes`` is computed from dtype and shape; give it explicitly only for a dtype this module
    does not know (such a tensor can be copied byte for byte, nothing else).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Any  # how the fold makes it (a FoldOperation); the writer only passes it back
    nbytes: int = -1

    def __post_init__(self) -> None:
        if self.nbytes < 0:
            self.nbytes = math.prod(self.shape) * ITEMSIZE[self.dtype]


def encode_header(tensors: Iterable[OutputTensor], metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix and JSON header for ``tensors`` laid out back to back in order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the safetensors library does,
    so tensor data starts aligned.

    Args:
        tensors: the tensors, in the order their bytes will follow the header.
        metadata: the ``__metadata__`` strings (``{"format": "pt"}``), or None.

    Returns:
        The bytes to write at the start of the file.
    """
    document: dict[str, Any] = {}
    if metadata:
        document["__metadata__"] = dict(metadata)
    offset = 0
    for tensor in tensors:
        document[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                                 "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(document, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def layout_order(tensors: Iterable[OutputTensor]) -> list[OutputTensor]:
    """Order tensors as the safetensors library does (wider dtypes first, then by name), which
    keeps every tensor aligned to its element size."""
    return sorted(tensors, key=lambda t: (-ITEMSIZE.get(t.dtype, 1), t.name))


def write_error(exc: OSError, path: Path) -> HypermergeError:
    """Turn an OSError from writing ``path`` into a one-line error that says what to do.

    Args:
        exc: the error (ENOSPC, EDQUOT, EFBIG, EACCES, EROFS... get their own advice).
        path: the file being written.

    Returns:
        The HypermergeError to raise.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HypermergeError(f"ran out of disk space writing {path.name} ({reason})", path=path.parent,
                               hint="free space or pass an --out on another disk; nothing was left behind")
    if exc.errno == errno.EFBIG:
        return HypermergeError(f"{path.name} grew past the largest file allowed here ({reason})", path=path.parent,
                               hint="raise the limit (ulimit -f) or pass a smaller --max-shard-size")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return HypermergeError(f"cannot write {path.name} ({reason})", path=path.parent,
                               hint="check permissions or choose another --out")
    return HypermergeError(f"writing {path.name} failed ({reason})", path=path.parent,
                           hint="check the disk holding the output")


class ShardWriter:
    """Writes one safetensors file: the header at once, then tensor bytes in header order.

    Every write is checked against the header's promise; the file is complete only when each
    tensor has been written in full, which ``close`` verifies.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: Mapping[str, str] | None):
        self.path = path
        self.tensors = tensors
        self._next = 0
        self._pending = 0  # bytes still owed for the current tensor
        try:
            self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
            self._write(encode_header(tensors, metadata))
        except OSError as exc:
            raise write_error(exc, path) from exc

    def _write(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        while len(view):
            written = self._file.write(view[:_MAX_IO])
            view = view[written:]

    def begin(self, name: str) -> OutputTensor:
        """Start the next tensor; its name must be the next in the header."""
        if self._pending:
            raise HypermergeError(f"internal error: {self.tensors[self._next - 1].name} was not written in full")
        tensor = self.tensors[self._next]
        if tensor.name != name:
            raise HypermergeError(f"internal error: expected {tensor.name}, got {name}")
        self._next += 1
        self._pending = tensor.nbytes
        return tensor

    def write(self, data: memoryview) -> None:
        """Append bytes of the current tensor."""
        size = data.nbytes
        if size > self._pending:
            raise HypermergeError(f"internal error: too many bytes for {self.tensors[self._next - 1].name}")
        try:
            self._write(data)
        except OSError as exc:
            raise write_error(exc, self.path) from exc
        self._pending -= size

    def copy_from(self, source: BinaryIO, offset: int, length: int, source_path: Path,
                  progress: Callable[[int], None] | None = None) -> None:
        """Append ``length`` bytes of ``source`` starting at ``offset``: kernel to kernel with
        ``copy_file_range`` when possible, else through a buffer of at most FALLBACK_CHUNK bytes,
        so memory stays bounded either way."""
        if length > self._pending:
            raise HypermergeError(f"internal error: too many bytes for {self.tensors[self._next - 1].name}")
        src, dst = source.fileno(), self._file.fileno()
        done = 0
        use_kernel = hasattr(os, "copy_file_range")
        while done < length:
            count = min(COPY_CHUNK if use_kernel else FALLBACK_CHUNK, length - done)
            copied = 0
            if use_kernel:
                try:
                    copied = os.copy_file_range(src, dst, count, offset + done)
                except OSError as exc:
                    if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ETXTBSY):
                        use_kernel = False  # another filesystem or an old kernel: copy through user space
                    elif exc.errno == errno.EIO:
                        # copy_file_range reports EIO for either side; name both files.
                        raise HypermergeError(f"copying from {source_path.name} to {self.path.name} failed "
                                              f"({exc.strerror})", path=source_path,
                                              hint="check the disks holding the base model and the output") from exc
                    else:
                        raise write_error(exc, self.path) from exc
            if not use_kernel:
                count = min(count, FALLBACK_CHUNK)
                try:
                    chunk = os.pread(src, count, offset + done)
                except OSError as exc:
                    raise CheckpointError(f"cannot read {source_path.name} ({exc.strerror})",
                                          path=source_path, hint="check the disk holding the base model") from exc
                copied = len(chunk)
                if copied:
                    try:
                        self._write(chunk)
                    except OSError as exc:
                        raise write_error(exc, self.path) from exc
            if copied == 0:
                raise CheckpointError(f"{source_path.name} ended early", path=source_path,
                                      hint="the file is truncated or was modified during the fold")
            done += copied
            if progress is not None:
                progress(copied)
        self._pending -= length

    def close(self) -> None:
        """Close the file; raise if any tensor promised by the header is missing."""
        try:
            self._file.close()
        except OSError as exc:
            raise write_error(exc, self.path) from exc
        if self._pending or self._next != len(self.tensors):
            raise HypermergeError(f"internal error: {self.path.name} was left incomplete")

    def abort(self) -> None:
        """Close without checks (the caller is failing anyway)."""
        try:
            self._file.close()
        except OSError:
            pass

