"""Lineage of continued jobs (issue 8): a job started from a fine-tuned model or a checkpoint
records its original base model and its parent job and checkpoint; a deleted fine-tuned model
keeps its job, marked with when the model was deleted.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("base_model", sa.String(512), nullable=True))
        batch.add_column(sa.Column("parent_job_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("parent_checkpoint_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("model_deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("model_deleted_at")
        batch.drop_column("parent_checkpoint_id")
        batch.drop_column("parent_job_id")
        batch.drop_column("base_model")
