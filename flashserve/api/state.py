"""The app's state: one typed object, built by `api/app.py: create_app`, read through `app_state`.

Routes and middleware never reach into `app.state` by attribute name: `app_state(request)` (or
`app_state(app)`) returns the `AppState`, and a type checker sees every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from flashserve.accounts.service import Accounts
from flashserve.backends.base import Backend
from flashserve.catalog import Catalog
from flashserve.server_key import ServerKey


@dataclass(slots=True)
class AppState:
    catalog: Catalog[Backend]  # model ids -> ModelCard + the Backend serving it
    accounts: Accounts  # keys, ledger, limits
    server_key: ServerKey  # the deployment secret: seals reasoning, signs sessions, keys the cache-salt hash
    sse_keepalive_s: float = 10.0  # an SSE comment after this long without an event
    max_body_bytes: int = 8 << 20  # a larger request body gets 413 before it is parsed
    draining: bool = False  # set by `api/app.py: drain`: new requests get 503
    inflight: int = 0  # requests in flight (a streamed response until its last byte), for the drain
    # The Anthropic surface's model names: glob pattern -> catalog model id (api/anthropic.py: catalog_model)
    anthropic_models: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ANTHROPIC_MODELS))
    # Stored responses (api/responses.py): kept this long, expired rows purged this often by the lifespan
    responses_retention_days: float = 30.0
    responses_purge_interval_s: float = 3600.0


DEFAULT_ANTHROPIC_MODELS = {"claude-*": "deepseek/deepseek-v4-flash"}  # as DeepSeek's own Anthropic endpoint


def app_state(where: HTTPConnection | Starlette) -> AppState:
    app = where.app if isinstance(where, HTTPConnection) else where
    state: AppState = app.state.flashserve
    return state
