"""Bearer authentication for `/v1/*`: the dependency that resolves the caller."""

from __future__ import annotations

from fastapi import Request

from flashserve.api.errors import INVALID_REQUEST, OpenAIError


def require_api_key(request: Request) -> str:
    """Returns the caller's tenant id; 401 for a missing or wrong key. The key is never echoed."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise OpenAIError(401, "You didn't provide an API key. Provide it in the Authorization header as "
                          "'Bearer YOUR_KEY'.", INVALID_REQUEST, None, "invalid_api_key")
    tenant = request.app.state.keys.verify(token.strip())
    if tenant is None:
        raise OpenAIError(401, "Incorrect API key provided.", INVALID_REQUEST, None, "invalid_api_key")
    return tenant
