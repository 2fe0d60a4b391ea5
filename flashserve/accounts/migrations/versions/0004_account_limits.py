"""account limits: concurrency, RPM and TPM of an account (all its keys) and of each of its end users

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Six nullable integer columns on `accounts`; NULL means unlimited, so every existing account keeps
working exactly as before (only its keys' own limits apply).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("max_concurrent", "rpm", "tpm", "user_max_concurrent", "user_rpm", "user_tpm")


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("accounts", sa.Column(column, sa.Integer, nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 has it): a batch copy of `accounts` would have to
    # drop a table other tables' foreign keys point at.
    for column in COLUMNS:
        op.execute(f"ALTER TABLE accounts DROP COLUMN {column}")
