"""SMART Backend Services client registry and the client-assertion replay guard.

Revision ID: 0007
Revises: 0006

``auth_client``: one row per registered client (``synthport client add``): its public
keys (a JWKS document or a JWKS URL), the most it may be granted (scopes), the DIMSE
calling AE titles that act as it, and flags (purpose of use, de-identified access).
``auth_jti``: ``jti`` values of client assertions already used, kept until they expire
(SMART Backend Services: a replayed ``jti`` is refused).
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_client",
        sa.Column("client_id", sa.String(256), primary_key=True),
        sa.Column("name", sa.Text, nullable=False, default=""),
        sa.Column("jwks", sa.Text, nullable=True),
        sa.Column("jwks_url", sa.Text, nullable=True),
        sa.Column("scopes", sa.Text, nullable=False, default=""),
        sa.Column("ae_titles", sa.Text, nullable=False, default=""),
        sa.Column("purpose", sa.String(64), nullable=False, default=""),
        sa.Column("deidentified", sa.Boolean, nullable=False, default=False),
        sa.Column("active", sa.Boolean, nullable=False, default=True),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "auth_jti",
        sa.Column("key", sa.String(512), primary_key=True),
        sa.Column("expires", sa.Float, nullable=False),
    )
    op.create_index("ix_auth_jti_expires", "auth_jti", ["expires"])


def downgrade() -> None:
    op.drop_index("ix_auth_jti_expires", "auth_jti")
    op.drop_table("auth_jti")
    op.drop_table("auth_client")
