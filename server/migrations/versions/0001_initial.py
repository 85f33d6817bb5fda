"""Initial schema: versioned resources and typed search index tables.

Revision ID: 0001
Revises:
"""
from alembic import op

from server.db.schema import metadata

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = ["resource", "idx_string", "idx_token", "idx_date", "idx_reference",
          "idx_quantity", "idx_number", "idx_uri", "idx_composite"]


def upgrade() -> None:
    bind = op.get_bind()
    # The 0001 tables are exactly the declared ones; later revisions use op.* explicitly.
    metadata.create_all(bind, tables=[metadata.tables[t] for t in TABLES])


def downgrade() -> None:
    bind = op.get_bind()
    metadata.drop_all(bind, tables=[metadata.tables[t] for t in reversed(TABLES)])
