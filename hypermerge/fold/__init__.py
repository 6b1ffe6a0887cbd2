"""Folding adapters into dense weights."""

from hypermerge.fold.engine import FoldResult, fold_checkpoint

__all__ = ["FoldResult", "fold_checkpoint"]
