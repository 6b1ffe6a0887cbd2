"""Atomic output directories: every command writes into a temporary sibling and renames it at
the end, so a crash, a kill or an error never leaves a partial output."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from hypermerge.errors import CheckpointError, HypermergeError, OutputExistsError

_TMP_MARK = ".hm-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(parent: Path) -> list[Path]:
    """Remove temporary siblings left behind by killed runs (their process is gone).

    A run killed between moving the old output aside and moving the new one in leaves the old
    output as an ``-old-`` temporary and no output: that one is put back, not removed.
    """
    removed = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:  # no such directory (nothing to clean), or not readable
        return removed
    for entry in entries:
        if _TMP_MARK not in entry.name:
            continue
        name, _, rest = entry.name.partition(_TMP_MARK)
        try:
            pid = int(rest.split("-", 1)[0])
        except ValueError:
            continue
        if _pid_alive(pid):
            continue
        output = parent / name
        if rest.split("-")[1:2] == ["old"] and not output.exists():
            try:
                os.replace(entry, output)
                continue
            except OSError:
                pass
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` only if the block succeeds.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false (checked before any work).
    """
    out = Path(out).absolute()
    parent = out.parent
    # first: a killed run's old output put back counts as existing
    clean_stale_temporaries(parent)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            "output already exists", path=out, hint="choose another --out or pass --overwrite"
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HypermergeError(f"cannot create the output's parent ({exc.strerror})", path=parent,
                              hint="choose a writable location") from exc
    tmp = parent / f"{out.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise HypermergeError(f"cannot write the output ({exc.strerror})", path=parent,
                              hint="choose a writable location") from exc
    try:
        yield tmp
        if out.exists():
            trash = parent / f"{out.name}{_TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.EFBIG:
            raise HypermergeError(f"a file grew past the largest file allowed here ({exc.strerror})", path=out,
                                  hint="raise the file size limit (ulimit -f) or write to another filesystem") from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HypermergeError(f"ran out of space writing the output ({exc.strerror})", path=out,
                                  hint="free disk space or write elsewhere") from exc
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise HypermergeError(f"cannot write the output ({exc.strerror})", path=out,
                                  hint="check permissions or write elsewhere") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def require_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path, or raise a CheckpointError naming what was expected there."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found", path=path, hint="check the path")
    if not path.is_dir():
        raise CheckpointError(f"{what} must be a directory", path=path, hint="pass the directory that holds it")
    return path
