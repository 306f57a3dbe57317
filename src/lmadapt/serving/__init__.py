"""Serving many adapters over one base model: the batching engine (:mod:`lmadapt.serving.engine`) and, above it,
the OpenAI-compatible HTTP server (``lmadapt serve``). See docs/serving.md.

Importing this package loads the engine only; the HTTP modules (FastAPI, uvicorn) load when imported themselves.
"""

from lmadapt.serving.engine import (
    Engine,
    EngineStoppedError,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    RequestError,
    RequestHandle,
    SamplingParams,
    TokenEvent,
    UnknownAdapterError,
)

__all__ = ["Engine", "EngineStoppedError", "GenerationRequest", "GenerationResult", "QueueFullError", "RequestError",
           "RequestHandle", "SamplingParams", "TokenEvent", "UnknownAdapterError"]
