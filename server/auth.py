"""API key check (`Authorization: Bearer KEY`, as the OpenAI clients send it).

A pure ASGI middleware rather than a route dependency: FastAPI reads and parses the body
before it runs dependencies, so a client without the key would learn about its JSON (400)
before being told it may not ask (401), and a stranger's body would be parsed at all."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from headwise.server.errors import APIError

# /health, /metrics and /openapi.json stay open for probes and scrapers
PROTECTED = ("/v1", "/tokenize", "/detokenize")


def is_protected(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PROTECTED)


def key_matches(authorization: str, expected: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    # compare_digest: the time taken must not reveal how much of a guess was right
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


class APIKeyMiddleware:
    """401 on the protected paths unless the bearer token is the key; no key: all pass."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_key is not None and is_protected(scope["path"]):
            sent = [value for name, value in scope.get("headers") or [] if name == b"authorization"]
            error = None
            if len(sent) > 1:
                # proxies and frameworks disagree on which of two wins; refuse rather than pick one
                error = APIError(
                    401,
                    f"send exactly one Authorization header, got {len(sent)}",
                    None,
                    "duplicate_authorization",
                )
            elif not key_matches(sent[0].decode("latin-1") if sent else "", self.api_key):
                error = APIError(
                    401,
                    "invalid API key: send `Authorization: Bearer <key>` with the server's --api-key",
                    None,
                    "invalid_api_key",
                )
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
