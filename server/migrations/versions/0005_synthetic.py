"""Synthetic data registry: trained models and the cohorts served from them.

Revision ID: 0005
Revises: 0004

``synthetic_model`` has one row per (name, version) of a trained model set (patient,
event and image models saved under ``<data_dir>/models/<name>/v<version>/``);
``synthetic_cohort`` one row per cohort (model, seed, size), whose patient-level index
lives in ``<data_dir>/cohorts/<name>/index.parquet``. JSON columns are stored as text so
the same schema serves SQLite and PostgreSQL.
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "synthetic_model",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kinds", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("settings", sa.Text, nullable=False),
        sa.Column("timings", sa.Text, nullable=False),
        sa.Column("evaluation", sa.Text, nullable=True),
        sa.Column("licence", sa.Text, nullable=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_synthetic_model_name_version"),
    )
    op.create_table(
        "synthetic_cohort",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("settings", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("synthetic_cohort")
    op.drop_table("synthetic_model")
