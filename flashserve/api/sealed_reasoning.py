"""Reasoning that travels through the client sealed: Anthropic thinking signatures, Responses
`encrypted_content`.

Clients that keep no server state (Claude Code with `display: "omitted"`, Codex with `store: false`) get the
model's reasoning back as an opaque token and return it on the next turn, so the model's encoding can render
it again. The token is the reasoning text sealed (AES-GCM) with the deployment secret's "reasoning-seal" key
and bound to the account: another account, a tampered token or another deployment's token is a 400, and
nobody can read or forge reasoning through a client.
"""

from __future__ import annotations

from flashserve.errors import invalid_request
from flashserve.server_key import SealError, ServerKey

_PURPOSE = "reasoning-seal"


def seal_reasoning(key: ServerKey, account_id: str, text: str) -> str:
    return key.seal(_PURPOSE, text.encode("utf-8"), account_id.encode("utf-8"))


def open_reasoning(key: ServerKey, account_id: str, token: str, param: str) -> str:
    """The reasoning a sealed token holds; a 400 naming `param` when it was not sealed here for this
    account or was changed."""
    try:
        return key.open(_PURPOSE, token, account_id.encode("utf-8")).decode("utf-8")
    except (SealError, UnicodeDecodeError):
        raise invalid_request("The sealed reasoning was not issued by this server for this account, or it was "
                              "changed.", param, "invalid_encrypted_content") from None
