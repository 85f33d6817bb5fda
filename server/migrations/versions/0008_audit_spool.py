"""How far each audit spool segment has been merged into the log.

Revision ID: 0008
Revises: 0007

On SQLite, read-side audit entries are first appended to spool files under the data
directory and merged into ``audit_entry`` in batches (server/audit/spool.py). A merge
commits its entries and the segment's new ``merged_to`` byte offset in one transaction,
so a crash between that commit and the removal of the file never merges a line twice.
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_spool",
        sa.Column("segment", sa.String(64), primary_key=True),
        sa.Column("merged_to", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_spool")
