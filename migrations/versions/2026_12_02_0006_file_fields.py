"""Which top-level keys a file's lines have (`files.field_stats`), recorded at upload, so that job
creation refuses with a 400 naming the first line a grader's `{{item.<key>}}` or KTO's `label`
is missing from. Nullable: files uploaded before it have none and are checked by the worker, as
they were.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("field_stats", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_column("field_stats")
