"""DICOM studies whose ImagingStudy waits for its association to end (C-STORE batching).

Revision ID: 0004
Revises: 0003

``dicom_study.fhir_pending`` is set in the transaction that stores an instance over
DIMSE and cleared by the transaction that writes the study's ImagingStudy (once per
association, see docs/adr/0006-imagingstudy-per-association.md); a crash in between
leaves the flag set and the DIMSE listener links those studies when it starts.
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dicom_study", sa.Column("fhir_pending", sa.Boolean, nullable=False,
                                           server_default=sa.false()))
    op.create_index("ix_dicom_study_pending", "dicom_study", ["fhir_pending"])


def downgrade() -> None:
    op.drop_index("ix_dicom_study_pending", table_name="dicom_study")
    op.drop_column("dicom_study", "fhir_pending")
