"""Audit log: IHE BALP AuditEvents as the leaves of an RFC 9162 Merkle tree.

Revision ID: 0006
Revises: 0005

``audit_entry`` holds one row per leaf (``seq`` = leaf index, from 0, no gaps): the
AuditEvent JSON bytes exactly as hashed, the leaf hash, and copies of the values that
``/fhir/AuditEvent`` searches on; ``audit_ref`` indexes the references of its entities
(patients and other resources). ``audit_state`` is a single row (id 1) with the tree
size and the right frontier of the tree, locked by every append so leaves get
consecutive indexes across workers. ``audit_node`` keeps the roots of the perfect
subtrees of 256 leaves and more, so proofs cost O(log n) reads. ``audit_sth`` keeps
signed tree heads. All but ``audit_entry.entry`` is derived data that
``synthport audit verify`` recomputes and compares.
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_entry",
        sa.Column("seq", PK, primary_key=True, autoincrement=False),
        sa.Column("recorded", sa.Float, nullable=False),
        sa.Column("entry", sa.LargeBinary, nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary, nullable=False),
        sa.Column("action", sa.String(1), nullable=False),
        sa.Column("subtype", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(2), nullable=False),
        sa.Column("agent", sa.String(256), nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
    )
    op.create_index("ix_audit_entry_recorded", "audit_entry", ["recorded"])
    op.create_index("ix_audit_entry_agent", "audit_entry", ["agent", "seq"])
    op.create_table(
        "audit_ref",
        sa.Column("ref", sa.String(256), primary_key=True),
        sa.Column("seq", PK, primary_key=True, autoincrement=False),
    )
    op.create_index("ix_audit_ref_seq", "audit_ref", ["seq"])
    op.create_table(
        "audit_node",
        sa.Column("level", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("idx", PK, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "audit_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("tree_size", sa.BigInteger, nullable=False),
        sa.Column("frontier", sa.Text, nullable=False),
    )
    op.execute("INSERT INTO audit_state (id, tree_size, frontier) VALUES (1, 0, '[]')")
    op.create_table(
        "audit_sth",
        sa.Column("tree_size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root_hash", sa.LargeBinary, nullable=False),
        sa.Column("timestamp", sa.Float, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_sth")
    op.drop_table("audit_state")
    op.drop_table("audit_node")
    op.drop_index("ix_audit_ref_seq", "audit_ref")
    op.drop_table("audit_ref")
    op.drop_index("ix_audit_entry_agent", "audit_entry")
    op.drop_index("ix_audit_entry_recorded", "audit_entry")
    op.drop_table("audit_entry")
