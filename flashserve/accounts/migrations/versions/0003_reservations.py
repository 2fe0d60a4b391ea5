"""reserved balances, granted credit and per-key spending caps

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

- accounts.reserved_pusd: what open reservations hold (moved out of balance_pusd at admission);
- accounts.granted_pusd: the promotional part of the account's money, spent first;
- topups.kind: 'topup' or 'grant' (every existing row was a top-up);
- api_keys.daily_cap_pusd / monthly_cap_pusd: spending caps per key (NULL: none);
- reservations: one row per admitted request until it settles, with its gateway and heartbeat;
- ix_usage_key_created: a key's charges in a day or month, for the caps.

Existing rows need no rewrite: with no request in flight nothing is reserved, nothing was granted, and the
identity balance + reserved + Σ charges = Σ credits already holds.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("reserved_pusd", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("granted_pusd", sa.BigInteger, nullable=False, server_default="0"))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("daily_cap_pusd", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("monthly_cap_pusd", sa.BigInteger, nullable=True))
    with op.batch_alter_table("topups") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="topup"))
    op.create_table(
        "reservations",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("prompt_cost_pusd", sa.BigInteger, nullable=False),
        sa.Column("amount_pusd", sa.BigInteger, nullable=False),
        sa.Column("gateway_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("heartbeat_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_reservations_account_id", "reservations", ["account_id"])
    op.create_index("ix_reservations_key_id", "reservations", ["key_id"])
    op.create_index("ix_reservations_gateway_id", "reservations", ["gateway_id"])
    op.create_index("ix_reservations_heartbeat_at", "reservations", ["heartbeat_at"])
    op.create_index("ix_usage_key_created", "usage_records", ["key_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_key_created", "usage_records")
    op.drop_table("reservations")
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 has it): a batch copy of `accounts` or `api_keys`
    # would have to drop a table other tables' foreign keys point at.
    for table, column in (("topups", "kind"), ("api_keys", "monthly_cap_pusd"), ("api_keys", "daily_cap_pusd"),
                          ("accounts", "granted_pusd"), ("accounts", "reserved_pusd")):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
