"""console: top-up codes and password users

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

Top-up codes (single-use, made in batches, redeemed once with a `topups` row as the audit trail) and the
console's optional name-and-password users. Both are new tables; no existing row changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "topup_codes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("batch_id", sa.String(40), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("amount_pusd", sa.BigInteger, nullable=False),
        sa.Column("note", sa.String(200), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("redeemed_at", sa.DateTime, nullable=True),
        sa.Column("redeemed_by", sa.String(40), sa.ForeignKey("accounts.id"), nullable=True),
        sa.Column("topup_id", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_topup_codes_batch_id", "topup_codes", ["batch_id"])
    op.create_table(
        "console_users",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(300), nullable=False),
        sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_console_users_account_id", "console_users", ["account_id"])


def downgrade() -> None:
    op.drop_table("console_users")
    op.drop_table("topup_codes")
