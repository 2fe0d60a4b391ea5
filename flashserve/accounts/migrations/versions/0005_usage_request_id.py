"""usage rows carry the HTTP request's x-request-id

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

A nullable column: rows written before it have no request id, and a row's object id (`request_id`,
chatcmpl-… / msg_… / resp_…) stays what it was. Indexed, to find the usage row of a request seen in the logs.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("x_request_id", sa.String(128), nullable=True))
        batch.create_index("ix_usage_records_x_request_id", ["x_request_id"])


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_index("ix_usage_records_x_request_id")
        batch.drop_column("x_request_id")
