"""Real clients against `hypermerge serve`: the official `openai` SDK (embeddings with its default
base64 encoding and with floats; completions plain and streamed) on a served all-MiniLM-L6-v2 and a
tiny Llama, and sentence-transformers as the embedding reference. Everything stays on loopback.
Slow: a real MiniLM export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openai
import pytest
from sentence_transformers import SentenceTransformer

import hypermerge as hm
from tests.helpers.common import minilm_dir, save_with_tokenizer
from tests.helpers.serving import Server

pytestmark = pytest.mark.slow

TEXTS = ["A gripping, beautifully acted film.", "The plot never comes together.", "short",
         "Folding adapters into dense weights removes their runtime overhead."]
PROMPT = "once upon a time"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("client-exports")
    lm = save_with_tokenizer("llama", root / "llama-source")
    return {"embed": hm.export_model(minilm_dir(), root / "minilm", verify=False, progress=False).out,
            "lm": hm.export_model(lm, root / "llama", verify=False, progress=False).out}


@pytest.fixture(scope="module")
def clients(exported):
    """name -> an OpenAI client on a running server."""
    servers = {name: Server(path, "-q") for name, path in exported.items()}
    try:
        ready = {name: server.wait_ready() for name, server in servers.items()}
        yield {name: openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
               for name, server in ready.items()}
    finally:
        for server in servers.values():
            server.signal()
        for server in servers.values():
            server.terminate()


def test_openai_embeddings_base64_default_and_floats_match_sentence_transformers(clients, exported):
    client = clients["embed"]
    by_default = client.embeddings.create(model="minilm", input=TEXTS)  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    default_vectors = np.float32([d.embedding for d in by_default.data])
    float_vectors = np.float32([d.embedding for d in floats.data])
    assert default_vectors.shape == (4, 384) and [d.index for d in floats.data] == [0, 1, 2, 3]
    np.testing.assert_array_equal(default_vectors, float_vectors)
    np.testing.assert_array_equal(float_vectors, hm.OnnxModel.load(exported["embed"], provider="cpu").embed(TEXTS))
    assert by_default.usage.prompt_tokens == floats.usage.prompt_tokens > 0

    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    cosine = (float_vectors * reference).sum(1) / np.linalg.norm(float_vectors, axis=1) / np.linalg.norm(reference,
                                                                                                          axis=1)
    assert cosine.min() > 1 - 1e-5, cosine
    np.testing.assert_allclose(float_vectors, reference, rtol=0, atol=1e-4)


def test_openai_completions_plain_and_streamed(clients, exported):
    client = clients["lm"]
    plain = client.completions.create(model="llama", prompt=PROMPT, max_tokens=8, temperature=0)
    (choice,) = plain.choices
    expected = hm.OnnxModel.load(exported["lm"], provider="cpu").generate([PROMPT], max_new_tokens=8)[0]
    assert choice.text == expected and choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens >= 1

    chunks = list(client.completions.create(model="llama", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
