"""API key check (`Authorization: Bearer KEY`, as the OpenAI clients send it)."""

from __future__ import annotations

import hmac

from fastapi import Request

from headwise.server.errors import APIError


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: passes when no key is configured or the bearer token matches."""
    expected: str | None = request.app.state.headwise.settings.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not reveal how much of a guess was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(401, "invalid API key: send `Authorization: Bearer <key>` with the server's --api-key",
                       None, "invalid_api_key")
