"""torch's intra-op thread count, set for the length of a block and restored after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# torch threads used while folding (fold and patch). The work per tensor is a few memory-bound
# passes (add, finite check, cast) between reads and writes; extra OpenMP threads gain little
# there, and on a machine whose cores are busy they cost 10-20x (each parallel region waits for
# its slowest thread).
FOLD_THREADS = 1


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, then restore the previous count.

    The count is restored however the block ends (an error, a KeyboardInterrupt), so a library
    call never leaves the caller's process with another setting.

    Args:
        threads: the count for the block; None or 0 leaves torch's setting as it is.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
