"""Streaming detokenization: generated token ids in, text deltas out, such that the deltas joined
are exactly the text that decoding all the tokens at once gives (``tokenizer.decode(ids,
skip_special_tokens=True)``), cut at the first stop string.

Decoding token by token is not a plain concatenation, for three reasons this module handles:

- byte-level BPE (GPT-2, Llama 3, SmolLM) splits a multi-byte character over several tokens; until
  the last one arrives the decoded text ends in U+FFFD. Trailing U+FFFD is held back.
- some decoders rewrite spacing around what follows (BERT's WordPiece clean-up turns ``do n't`` into
  ``don't`` and ``a .`` into ``a.``): text already decoded changes when the next token comes. For
  those tokenizers (found by a round-trip probe, :func:`needs_word_holdback`) the last word is held
  back until a later whitespace makes it final, as transformers' ``TextStreamer`` does.
- a stop string may arrive over several tokens: a tail of the text that could be the start of a stop
  string is held back until it either completes the stop string (the text is cut before it) or
  cannot any more.

Decoding the whole sequence at every step costs O(n) per token; for the few hundred tokens a
request generates that is well under the cost of the model step itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Each of these is rewritten by at least one common decoder's clean-up (transformers'
# clean_up_tokenization, the tokenizers WordPiece decoder with cleanup=True).
_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're k"
_LAST_WHITESPACE = re.compile(r"\s\S*\Z")


def needs_word_holdback(tokenizer) -> bool:
    """Whether decoding more tokens can change text decoded earlier (a clean-up decoder).

    A tokenizer that decodes ``a . b ? ...`` back to itself keeps decoded text stable and streams
    token by token; one that rewrites it streams word by word.
    """
    ids = tokenizer.encode(_PROBE, add_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=True).strip() != _PROBE


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


class TextStream:
    """Turns token ids, pushed one at a time, into text deltas.

    Args:
        tokenizer: a :class:`~hypermerge.runtime.tokenizer.TextTokenizer` or a transformers tokenizer
            (``encode`` and ``decode`` are all it uses).
        stop: stop strings; the text ends before the first one found (it is not included).
        word_holdback: hold back the last word (None: ask :func:`needs_word_holdback`).

    ``push(token_id)`` returns the newly final text (maybe ""); ``finish()`` returns the rest. After
    ``stopped`` is true, pushing more tokens changes nothing.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), *, word_holdback: bool | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.word_holdback = needs_word_holdback(tokenizer) if word_holdback is None else word_holdback
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final with it."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            found = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.stopped = True
                return self.finish()
        end = len(self.text.rstrip("\ufffd"))  # an incomplete multi-byte character
        if self.word_holdback:
            last = _LAST_WHITESPACE.search(self.text, 0, end)
            end = last.start() if last else 0
        if self.stop:
            end = min(end, len(self.text) - _stop_prefix_len(self.text, self.stop))
        if end <= self.sent:
            return ""
        delta = self.text[self.sent:end]
        self.sent = end
        return delta

    def finish(self) -> str:
        """The text not returned yet (call once generation has ended)."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta
