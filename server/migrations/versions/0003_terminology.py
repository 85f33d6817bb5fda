"""Terminology: bulk concept storage of imported code systems (server/terminology/).

Revision ID: 0003
Revises: 0002

Written out with ``op.create_table`` (not from ``server.db.schema``) so that this
revision keeps creating exactly these tables when the declared schema moves on.
See docs/adr/0005-terminology-storage.md.
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "term_codesystem",
        sa.Column("pk", PK, primary_key=True, autoincrement=True),
        sa.Column("url", sa.String(512), nullable=False),
        sa.Column("version", sa.String(128), nullable=False, server_default=""),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(256), nullable=False, server_default=""),
        sa.Column("content", sa.String(16), nullable=False, server_default="complete"),
        sa.Column("concept_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("ux_term_codesystem_url_version", "term_codesystem", ["url", "version"],
                    unique=True)

    op.create_table(
        "term_concept",
        sa.Column("cs_pk", sa.BigInteger, nullable=False),
        sa.Column("code", sa.String(256), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("display", sa.Text, nullable=True),
        sa.Column("inactive", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("data", sa.LargeBinary, nullable=True),
    )
    op.create_index("ux_term_concept_cs_code", "term_concept", ["cs_pk", "code"], unique=True)

    op.create_table(
        "term_parent",
        sa.Column("cs_pk", sa.BigInteger, nullable=False),
        sa.Column("child", sa.String(256), nullable=False),
        sa.Column("parent", sa.String(256), nullable=False),
    )
    op.create_index("ix_term_parent_child", "term_parent", ["cs_pk", "child", "parent"])
    op.create_index("ix_term_parent_parent", "term_parent", ["cs_pk", "parent", "child"])


def downgrade() -> None:
    for table in ("term_parent", "term_concept", "term_codesystem"):
        op.drop_table(table)
