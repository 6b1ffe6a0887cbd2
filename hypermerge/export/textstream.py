"""Moved to :mod:`hypermerge.runtime.textstream` (the runtime needs it without torch); kept for old imports."""

from hypermerge.runtime.textstream import TextStream, needs_word_holdback

__all__ = ["TextStream", "needs_word_holdback"]
