"""Request bodies of the HTTP API (pydantic), in the shapes OpenAI clients already send.

Unknown fields are refused (400 naming the field) rather than ignored: a client asking for
``logprobs`` or ``n: 2`` must not silently get something else. ``adapter`` (the encoder and
completion endpoints) names one of the adapters the server was started with. ``model`` and ``user`` are accepted
from every OpenAI client and ignored (one server serves one model).

Limits that depend on the server (texts per request, tokens per text) are checked by the app;
what depends on the request alone (types, empty input, ranges) is checked here.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIRequest(BaseModel):
    """Fields every endpoint accepts."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Accepted for OpenAI clients; the server serves one model.")
    user: str | None = Field(None, description="Accepted for OpenAI clients; ignored.")


class AdapterField(BaseModel):
    """The per-request adapter of the endpoints that run the model."""

    adapter: str | None = Field(None, min_length=1, description=(
        "Name of an adapter the server was started with (hypermerge serve --adapter NAME=DIR); "
        "omitted or null: the base model. A name, never a path."))


def _texts(value: str | list[str], field: str) -> str | list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise ValueError(f"{field} must not be empty")
    for i, text in enumerate(texts):
        if not text:
            raise ValueError(f"{field}[{i}] is an empty string" if isinstance(value, list) else
                             f"{field} is an empty string")
    return value


class EncoderRequest(AdapterField, APIRequest):
    """What every encoder endpoint (embeddings, classify) takes.

    Micro-batching merges requests with equal :meth:`batch_key`. A request-level option that changes
    the model's computation (a runtime adapter, say) goes here and into ``batch_key``, so requests
    with different values are never merged into one batch.
    """

    input: str | list[str] = Field(..., description="A text or a list of texts.")
    truncate: bool = Field(False, description="Cut texts longer than the model's limit instead of refusing them.")

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        return _texts(value, "input")

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def batch_key(self) -> Hashable:
        """Requests with equal keys may share a model run: the adapter's name (None: the base)."""
        return self.adapter


class EmbeddingRequest(EncoderRequest):
    """``POST /v1/embeddings`` (OpenAI's shape)."""

    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes (the OpenAI client's default).")


class ClassifyRequest(EncoderRequest):
    """``POST /v1/classify``."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with the token usage.")


class CompletionRequest(AdapterField, APIRequest):
    """``POST /v1/completions`` (OpenAI's legacy completions shape; its defaults too)."""

    prompt: str | list[str] = Field(..., description="A prompt or a list of prompts (each continued on its own).")
    max_tokens: int = Field(16, ge=1, description="Most tokens to generate per prompt.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stream: bool = Field(False, description="Send server-sent events as tokens are generated.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the text (not included).")
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    n: Literal[1] = Field(1, description="Completions per prompt: only 1.")

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        return _texts(value, "prompt")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("stop takes at most 4 strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
