"""Folding adapters into dense weights.

Modules: ``engine`` (``fold_checkpoint``: the stages, the index and the provenance), ``plan`` (the
adapter's tensors mapped onto the base's and checked, before any I/O), ``operations`` (how each
output tensor is made, shared with ``hypermerge patch``), ``shards`` (output layout and streaming
writes), ``safetensors_io`` (the file format, one tensor at a time), ``hfdir`` (a HF model
directory), ``base_check`` (is this the adapter's base, by content), ``finite`` (NaN/Inf checks),
``threads`` (torch's thread count for a block), ``verify`` (``--verify``: both models run).
"""

from hypermerge.fold.engine import FoldResult, fold_checkpoint

__all__ = ["FoldResult", "fold_checkpoint"]
