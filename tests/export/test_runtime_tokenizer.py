"""The runtime's tokenizer (tokenizer.json through the tokenizers library, no transformers) gives
what transformers' tokenizer gives on the same files: ids, segments, masks, padding on either
side, truncation (explicit and the model's own limit), decoding with and without special tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hypermerge.errors import ExportError
from hypermerge.runtime.tokenizer import TextTokenizer
from tests.helpers.common import minilm_dir

TEXTS = ["Hello world!", "Don't stop me now , I am having such a good time .", "ünïcödé  ✓ 日本語 🙂", "",
         "a much longer sentence " * 20]


def _byte_level(directory):
    """A byte-level BPE saved as transformers saves one (SmolLM2's kind: no segments, eos as pad)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 5, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        model_max_length=64)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["wordpiece", "byte-level"])
def directory(request, tmp_path_factory):
    if request.param == "wordpiece":  # MiniLM's own files (its tokenizer.json holds 128-token truncation)
        return minilm_dir()
    return _byte_level(tmp_path_factory.mktemp("bpe"))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_match_transformers(directory, side):
    reference, ours = AutoTokenizer.from_pretrained(directory), TextTokenizer.load(directory)
    if reference.pad_token is None:
        reference.pad_token, ours.pad_token = reference.eos_token, ours.eos_token
    reference.padding_side = ours.padding_side = side
    expected = reference(TEXTS, padding=True, return_tensors="np")
    got = ours(TEXTS, padding=True, return_tensors="np")
    assert list(got) == list(expected)  # the same keys: token_type_ids for BERT only
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert ours(TEXTS, padding=True) == {k: v.tolist() for k, v in expected.items()}


def test_unpadded_truncated_and_decoded_match_transformers(directory):
    reference, ours = AutoTokenizer.from_pretrained(directory), TextTokenizer.load(directory)
    assert ours(TEXTS) == dict(reference(TEXTS))
    assert ours(TEXTS[1]) == dict(reference(TEXTS[1]))
    assert ours(TEXTS, truncation=True, max_length=6) == dict(reference(TEXTS, truncation=True, max_length=6))
    # truncation without max_length: the model's limit (MiniLM 512, not tokenizer.json's 128)
    long = ["word " * 700]
    assert len(ours(long, truncation=True)["input_ids"][0]) == reference.model_max_length
    assert ours(long, truncation=True) == dict(reference(long, truncation=True))
    ids = reference(TEXTS)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == reference.batch_decode(ids, skip_special_tokens=skip)
    assert ours.encode(TEXTS[2], add_special_tokens=False) == reference.encode(TEXTS[2], add_special_tokens=False)
    assert (len(ours), ours.eos_token_id, ours.pad_token_id, ours.model_max_length) == \
        (len(reference), reference.eos_token_id, reference.pad_token_id, reference.model_max_length)


def test_concurrent_truncation_lengths_do_not_leak(tmp_path):
    ours = TextTokenizer.load(minilm_dir())
    text = ["word " * 50]
    assert len(ours(text, truncation=True, max_length=8)["input_ids"][0]) == 8
    assert len(ours(text)["input_ids"][0]) == 52  # the untruncated tokenizer was left as it was
    assert len(ours(text, truncation=True, max_length=16)["input_ids"][0]) == 16


def test_missing_or_damaged_tokenizer_is_one_clear_error(tmp_path):
    with pytest.raises(ExportError, match="no tokenizer.json"):
        TextTokenizer.load(tmp_path)
    shutil.copy(minilm_dir() / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(ExportError, match="cannot read tokenizer.json"):
        TextTokenizer.load(tmp_path)
