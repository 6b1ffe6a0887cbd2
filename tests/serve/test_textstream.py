"""Streaming detokenization: the deltas joined are exactly the text decoded at once, for a WordPiece
tokenizer whose decoder rewrites spacing (MiniLM's) and a byte-level BPE that splits characters
over tokens; and OnnxModel.stream against OnnxModel.generate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import hypermerge as hm
from hypermerge.export.textstream import TextStream, needs_word_holdback
from tests.helpers.common import minilm_dir

TRICKY = "don't . , ? ! 's 've a b héllo wörld ça 🙂 日本語 ##x"


@pytest.fixture(scope="module")
def tokenizers():
    wordpiece = AutoTokenizer.from_pretrained(minilm_dir())
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TRICKY, "The plot never comes together, ça va? 🙂 日本語のテキスト"] * 5,
                            vocab_size=300, min_frequency=1, show_progress=False)
    byte_level = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    return {"wordpiece": wordpiece, "byte-level": byte_level}


def test_holdback_is_needed_only_where_decoding_rewrites_text(tokenizers):
    assert needs_word_holdback(tokenizers["wordpiece"])  # "a ." decodes as "a."
    assert not needs_word_holdback(tokenizers["byte-level"])


def _streamed(tokenizer, ids: list[int], stop: list[str]) -> str:
    stream = TextStream(tokenizer, stop)
    text = ""
    for token in ids:
        text += stream.push(token)
        if stream.stopped:
            break
    return text + stream.finish()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_deltas_join_to_the_decoded_text_cut_at_the_first_stop(tokenizers, data):
    name = data.draw(st.sampled_from(sorted(tokenizers)))
    tokenizer = tokenizers[name]
    tricky = tokenizer.encode(TRICKY, add_special_tokens=False)
    token = st.one_of(st.integers(0, len(tokenizer) - 1), st.sampled_from(tricky))
    ids = data.draw(st.lists(token, min_size=1, max_size=16))
    stop = data.draw(st.lists(st.sampled_from([" ", "a", "'s", "l", ".", "o w", "🙂", "é", "ll"]), max_size=3))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    found = [full.find(s) for s in stop if s in full]
    assert _streamed(tokenizer, ids, stop) == (full[:min(found)] if found else full)


def test_multibyte_characters_are_never_split(tokenizers):
    tokenizer = tokenizers["byte-level"]
    ids = tokenizer.encode("ça 🙂 日本語", add_special_tokens=False)
    stream = TextStream(tokenizer)
    deltas = [stream.push(token) for token in ids] + [stream.finish()]
    assert "".join(deltas) == "ça 🙂 日本語" and not any("\ufffd" in d for d in deltas)


def test_onnx_stream_equals_generate(exports):
    model = hm.OnnxModel.load(exports["causal-lm"], provider="cpu")
    for prompt in ("the weather today is", "a"):
        for options in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}, {"stop_at_eos": False}):
            steps = list(model.stream(prompt, 20, **options))
            assert "".join(s.text for s in steps) == model.generate([prompt], 20, **options)[0]
            assert [s.tokens for s in steps] == list(range(1, len(steps) + 1))
            assert steps[-1].finish_reason in ("stop", "length") and all(s.finish_reason is None for s in steps[:-1])
            assert steps[-1].finish_reason == "length" or len(steps) < 20
    with pytest.raises(hm.ConfigError, match="max_new_tokens"):
        next(model.stream("a", 0))
