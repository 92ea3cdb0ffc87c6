"""The HTTP app: llama-cpp-python's OpenAI-compatible routes, on our model, plus health and stats.

``/v1/completions`` and ``/v1/chat/completions`` (streaming or not), ``/v1/embeddings`` and the
``/extras`` routes are llama-cpp-python's own (``llama_cpp.server.app.router``): they queue
requests on the one model behind their locks, and answer errors as OpenAI does. Ours come first:
``/v1/models`` (named after the bundle, answered without waiting for a running completion),
``/health``, ``/stats`` (JSON) and ``/metrics`` (Prometheus), and — when the bundle has no chat
template and no ``--chat-format`` was given — a 400 for chat instead of llama-cpp-python's silent
``llama-2`` guess. Bodies are validated first (:mod:`dymoe_gguf.serve.validate`): a bad one gets a
400, not llama-cpp-python's 500.
"""

from __future__ import annotations

import time
from typing import Any

from dymoe_gguf import __version__
from dymoe_gguf._native.llama import server_model
from dymoe_gguf.serve.metrics import prometheus, stats_json
from dymoe_gguf.serve.model import ModelThread, SerialLlama
from dymoe_gguf.serve.validate import ValidateRequests, error_body


class _OneModel:
    """What llama-cpp-python's routes expect of their ``LlamaProxy``, for one model already open."""

    def __init__(self, llama: SerialLlama, alias: str) -> None:
        self._llama = llama
        self.alias = alias

    def __call__(self, model: str | None = None) -> SerialLlama:
        return self._llama  # whatever name a request gives, as llama-cpp-python does with one model

    def __iter__(self) -> Any:
        yield self.alias

    def free(self) -> None:
        """The model is closed by :class:`ModelThread`, not by the routes."""


def create_app(model: ModelThread, alias: str) -> Any:
    """The FastAPI app serving ``model`` under the name ``alias``."""
    from fastapi import APIRouter, FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.middleware import Middleware
    from fastapi.responses import JSONResponse, PlainTextResponse
    from llama_cpp.server import app as upstream
    from llama_cpp.server.settings import ServerSettings
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    # queue concurrent requests: never cut a running stream short when another request arrives
    upstream.set_server_settings(ServerSettings(interrupt_requests=False))
    server_model(_OneModel(model.llama(alias), alias))

    session = model.session
    started = time.time()
    chat_ok = session.chat_format is not None or session.has_chat_template
    ours = APIRouter()

    async def controller_stats() -> dict[str, Any]:
        st = await run_in_threadpool(session.stats)  # mincore over the experts: off the event loop
        total, last = model.timings()
        return stats_json(alias, st, total, last)

    @ours.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": alias, "uptime_s": round(time.time() - started, 1)}

    @ours.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": alias, "object": "model", "created": int(started),
                                            "owned_by": "dymoe-gguf", "permissions": [],
                                            "meta": {"n_ctx": session.n_ctx, "chat": chat_ok}}]}

    @ours.get("/stats")
    async def stats() -> dict[str, Any]:
        return await controller_stats()

    @ours.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        d = await controller_stats()
        total, last = model.timings()
        return PlainTextResponse(prometheus(alias, d["controller"], total, last),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    if not chat_ok:
        @ours.post("/v1/chat/completions")
        async def no_chat() -> JSONResponse:
            return JSONResponse(status_code=400, content=error_body(
                f"{alias} has no chat template: restart the server with --chat-format (e.g. chatml, llama-2, "
                "mistral-instruct), or use /v1/completions", code="no_chat_template"))

    app = FastAPI(title=f"dymoe-gguf: {alias}", version=__version__,
                  middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),)),
                              Middleware(ValidateRequests)])
    app.include_router(ours)
    app.include_router(upstream.router)
    return app
