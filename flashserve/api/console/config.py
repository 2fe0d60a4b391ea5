"""The console's settings, as `create_app` takes them (`settings.py` fills them from the server's settings)."""

from __future__ import annotations

from dataclasses import dataclass

REGISTRATION_MODES = ("off", "open", "invite")


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    # Self-service accounts with a password: "off" (only API keys sign in), "open" (anyone may register) or
    # "invite" (registration needs `invite_code`).
    registration: str = "off"
    invite_code: str | None = None
    granted_balance_pusd: int = 0  # a new password account's starting (granted) balance
    session_ttl_s: int = 12 * 3600  # a session cookie's lifetime
    # Sign-in failures one client address may make per `signin_window_s` before it gets 429.
    signin_failures: int = 10
    signin_window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.registration not in REGISTRATION_MODES:
            raise ValueError(f"console registration must be one of {REGISTRATION_MODES}, not {self.registration!r}")
        if self.registration == "invite" and not self.invite_code:
            raise ValueError("console registration 'invite' needs an invite code")
