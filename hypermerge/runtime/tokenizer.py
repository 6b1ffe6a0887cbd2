"""The export's tokenizer without transformers: ``tokenizer.json`` run by the ``tokenizers`` library.

transformers' fast tokenizers are that same Rust tokenizer plus settings from
``tokenizer_config.json`` (special tokens, padding side, length limit, spacing clean-up).
:class:`TextTokenizer` reads those settings and offers the part of transformers' interface the
runtime, the server and the tests use (``tokenizer(texts, padding=..., truncation=...,
max_length=..., return_tensors=...)``, ``encode``, ``decode``, ``batch_decode``, the special tokens)
with the same results, so serving needs neither transformers nor torch.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from hypermerge.errors import ExportError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# transformers writes int(1e30) for "no limit"
_NO_LIMIT = 10**20


def _clean_up_spacing(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (for ``clean_up_tokenization_spaces: true``)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def _token_text(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# transformers' tokenizer classes whose model_input_names include token_type_ids (BERT's family)
_SEGMENT_CLASSES = ("Bert", "Electra", "MobileBert", "ConvBert", "SqueezeBert", "Funnel", "LayoutLM", "RoFormer",
                    "Albert", "DebertaV2", "Deberta", "XLNet")


def _uses_segments(config: dict, processor: dict | None) -> bool:
    """Whether a call returns ``token_type_ids``, as transformers decides it: the config's
    ``model_input_names``, else the tokenizer class (BERT's family), else a BERT post-processor."""
    names = config.get("model_input_names")
    if names:
        return "token_type_ids" in names
    cls = str(config.get("tokenizer_class") or "").removesuffix("Fast").removesuffix("Tokenizer")
    if cls:
        return cls in _SEGMENT_CLASSES
    return bool(processor) and processor.get("type") == "BertProcessing"


class TextTokenizer:
    """``tokenizer.json`` with the settings of ``tokenizer_config.json``; see :meth:`load`.

    Attributes set from the config and changeable like transformers' (``padding_side``,
    ``pad_token``, ``eos_token``, ``model_max_length``); ids follow the tokens.
    """

    def __init__(self, tokenizer_json: str, config: dict):
        self._json = tokenizer_json
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        # tokenizer.json may carry the padding and truncation it was saved with (sentence-
        # transformers' MiniLM: 128 tokens); transformers resets both on every call, as we do here
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._truncating: dict[int, object] = {}  # max_length -> a copy with that truncation
        self._lock = threading.Lock()
        self.padding_side: str = config.get("padding_side", "right")
        limit = config.get("model_max_length")
        self.model_max_length: int = int(limit) if isinstance(limit, (int, float)) and limit > 0 else int(1e30)
        for role in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
            setattr(self, f"{role}_token", _token_text(config.get(f"{role}_token")))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        segments = _uses_segments(config, json.loads(tokenizer_json).get("post_processor"))
        self.model_input_names = ["input_ids", "token_type_ids", "attention_mask"] if segments else \
            ["input_ids", "attention_mask"]

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        """The tokenizer of a model directory (``tokenizer.json`` + ``tokenizer_config.json``).

        Raises:
            ExportError: no ``tokenizer.json``, or a damaged one.
        """
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise ExportError(f"the export has no {TOKENIZER_FILE}", path=directory,
                              hint="export from a model directory with a fast tokenizer (tokenizer.json)")
        config: dict = {}
        for name in (SPECIAL_TOKENS_FILE, CONFIG_FILE):  # the config's entries win, as in transformers
            if (directory / name).is_file():
                try:
                    data = json.loads((directory / name).read_text())
                except ValueError as exc:
                    raise ExportError(f"{name} is not valid JSON ({exc})", path=directory / name,
                                      hint="the file is damaged; copy it again from the exported model") from None
                config.update(data if isinstance(data, dict) else {})
        try:
            return cls(path.read_text(), config)
        except Exception as exc:  # the Rust side raises plain Exception on a malformed file
            raise ExportError(f"cannot read {TOKENIZER_FILE} ({str(exc).splitlines()[0][:200]})", path=path,
                              hint="the file is damaged; copy it again from the exported model") from exc

    # -- special tokens ------------------------------------------------------------------------
    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    # -- encoding ------------------------------------------------------------------------------
    def _backend(self, max_length: int | None):
        """The Rust tokenizer truncating to ``max_length`` (None: not truncating). One copy per
        length, so concurrent callers (a server's threads) never change each other's settings."""
        if max_length is None:
            return self._tokenizer
        with self._lock:
            backend = self._truncating.get(max_length)
            if backend is None:
                backend = Tokenizer.from_str(self._json)
                backend.no_padding()
                backend.enable_truncation(max_length)
                self._truncating[max_length] = backend
        return backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], *, padding: bool = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 add_special_tokens: bool = True) -> dict:
        """Token ids as transformers returns them: lists (per text for a list of texts), or padded
        arrays with ``return_tensors="np"`` (or ``"pt"``, which needs torch).

        Returns:
            ``input_ids``, ``token_type_ids`` (tokenizers that have segments) and ``attention_mask``.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if truncation and max_length is None and self.model_max_length < _NO_LIMIT:
            max_length = self.model_max_length
        encodings = self._backend(max_length if truncation else None).encode_batch(
            texts, add_special_tokens=add_special_tokens)
        rows = {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                "attention_mask": [e.attention_mask for e in encodings]}
        rows = {name: rows[name] for name in self.model_input_names}
        if padding or return_tensors is not None:
            return self._pad(rows, return_tensors)
        return {name: values[0] for name, values in rows.items()} if single else rows

    def _pad(self, rows: dict[str, list[list[int]]], return_tensors: str | None) -> dict:
        longest = max((len(ids) for ids in rows["input_ids"]), default=0)
        pad_id = self.pad_token_id
        if pad_id is None and any(len(ids) < longest for ids in rows["input_ids"]):
            raise ExportError("the tokenizer has no padding token, so texts of different lengths cannot be batched",
                              hint="set pad_token in the export's tokenizer_config.json")
        fill = {"input_ids": pad_id or 0, "token_type_ids": 0, "attention_mask": 0}
        out = {}
        for name, values in rows.items():
            array = np.full((len(values), longest), fill[name], dtype=np.int64)
            for row, value in enumerate(values):
                if value:
                    cols = slice(longest - len(value), longest) if self.padding_side == "left" else slice(0, len(value))
                    array[row, cols] = value
            out[name] = array
        if return_tensors == "pt":
            import torch  # asked for by the caller: a test comparing with PyTorch

            return {name: torch.from_numpy(array) for name, array in out.items()}
        if return_tensors in (None, "np"):
            return out if return_tensors == "np" else {name: array.tolist() for name, array in out.items()}
        raise ValueError(f"return_tensors={return_tensors!r}: use 'np' or 'pt'")

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers skips the clean-up for BPE models (it would eat spaces before punctuation)
        if self.clean_up_tokenization_spaces and type(self._tokenizer.model).__name__ != "BPE":
            text = _clean_up_spacing(text)
        return text

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]
