"""The accounts database schema: accounts, API keys, credits (top-ups and grants), reservations and usage
records.

Money columns are integer picodollars (1e-12 USD) in 64-bit integers, so
sums are exact and a balance of up to ~$9.2 million fits. Times are naive
UTC. The schema is created and changed only by the Alembic migrations in
`migrations/`; this module is the source they were written from.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

accounts = sa.Table(
    "accounts", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    # What the account can spend now: credits minus charges minus what open reservations hold (migration 0003).
    sa.Column("balance_pusd", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime, nullable=False),
    # Σ amount of this account's open `reservations` (moved out of balance_pusd at admission).
    sa.Column("reserved_pusd", sa.BigInteger, nullable=False, server_default="0"),
    # The promotional part of balance_pusd + reserved_pusd; charges spend it first.
    sa.Column("granted_pusd", sa.BigInteger, nullable=False, server_default="0"),
    # Limits of the account, all its keys together (migration 0004; NULL: unlimited) ...
    sa.Column("max_concurrent", sa.Integer, nullable=True),
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
    # ... and of each of its end users, told apart by the requests' `user` field.
    sa.Column("user_max_concurrent", sa.Integer, nullable=True),
    sa.Column("user_rpm", sa.Integer, nullable=True),
    sa.Column("user_tpm", sa.Integer, nullable=True),
)
KEY_LIMIT_COLUMNS = ("max_concurrent", "rpm", "tpm")
ACCOUNT_LIMIT_COLUMNS = ("max_concurrent", "rpm", "tpm", "user_max_concurrent", "user_rpm", "user_tpm")

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("prefix", sa.String(32), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=True),
    sa.Column("revoked_at", sa.DateTime, nullable=True),
    sa.Column("max_concurrent", sa.Integer, nullable=True),
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
    # Spending caps (migration 0003): charges + open reservations per UTC day / calendar month. None: no cap.
    sa.Column("daily_cap_pusd", sa.BigInteger, nullable=True),
    sa.Column("monthly_cap_pusd", sa.BigInteger, nullable=True),
)

topups = sa.Table(
    "topups", metadata,
    sa.Column("id", BigIntId, primary_key=True, autoincrement=True),
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False, index=True),
    sa.Column("amount_pusd", sa.BigInteger, nullable=False),
    sa.Column("note", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False, server_default="topup"),  # CREDIT_KINDS (migration 0003)
)

# One row per admitted request until it settles (migration 0003): what admission moved out of the balance,
# which gateway holds it and when that gateway last said it is alive (a reaper settles stale ones).
reservations = sa.Table(
    "reservations", metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False, index=True),
    sa.Column("key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False, index=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("prompt_cost_pusd", sa.BigInteger, nullable=False),
    sa.Column("amount_pusd", sa.BigInteger, nullable=False),
    sa.Column("gateway_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("heartbeat_at", sa.DateTime, nullable=False, index=True),
)

usage_records = sa.Table(
    "usage_records", metadata,
    sa.Column("id", BigIntId, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, unique=True),
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("cached_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False),
    sa.Column("cost_pusd", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("latency_ms", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    # The HTTP request's x-request-id (migration 0005): joins a usage row to the request's log lines.
    sa.Column("x_request_id", sa.String(128), nullable=True, index=True),
    sa.Index("ix_usage_account_created", "account_id", "created_at"),
    sa.Index("ix_usage_key_created", "key_id", "created_at"),  # spending caps (migration 0003)
)

# The Responses API's stored responses (migration 0002): the response object as returned, the request's input
# items (GET .../input_items) and the whole conversation so far (what `previous_response_id` continues), as
# JSON text. ON DELETE CASCADE: an account's stored responses go with it.
stored_responses = sa.Table(
    "stored_responses", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False, index=True),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("input_items", sa.Text, nullable=False),
    sa.Column("conversation", sa.Text, nullable=False),
)

# Top-up codes (migration 0006): single-use codes, made in batches by an admin and sold offline; each is
# worth `amount_pusd`. Only the code's SHA-256 digest is stored (like a key's). Redeeming sets
# `redeemed_at`/`redeemed_by` and writes a `topups` row (`topup_id`), in one transaction.
topup_codes = sa.Table(
    "topup_codes", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("batch_id", sa.String(40), nullable=False, index=True),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(32), nullable=False),
    sa.Column("amount_pusd", sa.BigInteger, nullable=False),
    sa.Column("note", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("redeemed_at", sa.DateTime, nullable=True),
    sa.Column("redeemed_by", sa.String(40), sa.ForeignKey("accounts.id"), nullable=True),
    sa.Column("topup_id", sa.BigInteger, nullable=True),
)

# Console users who sign in with a name and a password (migration 0006): the scrypt hash of the password,
# the account they own, and the key the console bills their playground to (its plaintext is never kept).
console_users = sa.Table(
    "console_users", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(300), nullable=False),
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False, index=True),
    sa.Column("key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)
