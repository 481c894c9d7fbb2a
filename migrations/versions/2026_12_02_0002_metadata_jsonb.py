"""Job metadata as jsonb on PostgreSQL, which refuses NUL (`\\u0000`) when a row is written:
with plain json a stored NUL made every later `->>` filter on the project fail. Rows already
holding one lose the NUL characters first (the cast would refuse them). SQLite is unchanged.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    poisoned = bind.execute(
        sa.text("SELECT id, metadata::text FROM jobs WHERE strpos(metadata::text, :escape) > 0"),
        {"escape": "\\u0000"},
    ).all()
    for job_id, text in poisoned:
        repaired = json.dumps(_without_nul(json.loads(text)))
        bind.execute(
            sa.text("UPDATE jobs SET metadata = CAST(:value AS json) WHERE id = :id"),
            {"value": repaired, "id": job_id},
        )
    op.alter_column(
        "jobs",
        "metadata",
        type_=postgresql.JSONB(),
        existing_type=sa.JSON(),
        existing_nullable=True,
        postgresql_using="metadata::jsonb",
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column(
        "jobs",
        "metadata",
        type_=sa.JSON(),
        existing_type=postgresql.JSONB(),
        existing_nullable=True,
        postgresql_using="metadata::json",
    )
