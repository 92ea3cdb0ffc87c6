"""Bad requests get one 400 JSON error before they reach llama-cpp-python's routes.

Its routes catch every exception, request validation included, and answer 500 with a traceback on
stderr; a body that is not JSON fails inside that handler again. This ASGI middleware reads the body
of the routes below, validates it with the routes' own request models and answers OpenAI's error
shape (``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``); a valid body
is passed on unchanged.
"""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]


def _request_models() -> dict[str, Any]:
    from llama_cpp.server import types as t

    return {"/v1/completions": t.CreateCompletionRequest, "/v1/engines/copilot-codex/completions":
            t.CreateCompletionRequest, "/v1/chat/completions": t.CreateChatCompletionRequest,
            "/v1/embeddings": t.CreateEmbeddingRequest, "/extras/tokenize": t.TokenizeInputRequest,
            "/extras/tokenize/count": t.TokenizeInputRequest, "/extras/detokenize": t.DetokenizeInputRequest}


def error_body(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error document."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def check(model: Any, body: bytes) -> dict[str, Any] | None:
    """The error document for ``body``, or None when ``model`` accepts it."""
    from pydantic import ValidationError

    try:
        data = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return error_body(f"The request body is not JSON: {exc}", code="invalid_json")
    if not isinstance(data, dict):
        return error_body(f"Expected a JSON object as the request body, got {type(data).__name__}",
                          code="invalid_json")
    try:
        model.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors()
        first = errs[0]
        loc = [str(x) for x in first.get("loc", ())]
        param = loc[0] if loc else None
        # a union (prompt: str | list[str]) reports one error per alternative: name the field once
        more = len({e.get("loc", ("",))[0] for e in errs}) - 1
        msg = f"Invalid {param or 'request'}: {first.get('msg', 'invalid value')}"
        if "input" in first and loc:
            msg += f" (got {json.dumps(first['input'])[:80]})"
        if more > 0:
            msg += f"; and {more} more invalid field{'s' if more > 1 else ''}"
        return error_body(msg, param=param)
    return None


class ValidateRequests:
    """ASGI middleware: validate the JSON body of the OpenAI routes, answer 400 when it is bad."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.models = _request_models()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        model = self.models.get(scope.get("path", "")) if scope["type"] == "http" else None
        if model is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        err = check(model, body)
        if err is not None:
            from starlette.responses import JSONResponse

            await JSONResponse(err, status_code=400)(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then what follows the body (a disconnect)

        await self.app(scope, replay, send)
