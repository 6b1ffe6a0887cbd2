"""``POST /v1/embeddings`` (feature-extraction exports): mean-pooled, L2-normalised embeddings."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hypermerge.serve.schemas import EmbeddingRequest
from hypermerge.serve.service import Service


def router(service: Service) -> APIRouter:
    """The embeddings route of ``service``."""
    routes = APIRouter()

    @routes.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
        """Sentence embeddings (OpenAI's shape)."""
        vectors, tokens = await service.watched(request, service.encode(body.texts(), body.truncate,
                                                                        body.batch_key(), request.scope))
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": service.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return routes


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as JSON numbers, or as base64 of little-endian float32 (``"encoding_format": "base64"``)."""
    if encoding_format == "base64":  # what the OpenAI Python client asks for by default
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
