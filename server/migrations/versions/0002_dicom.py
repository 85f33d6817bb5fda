"""DICOM store: patient / study / series / instance tables (server/dicom/store.py).

Revision ID: 0002
Revises: 0001

Written out with ``op.create_table`` (not from ``server.db.schema``) so that this
revision keeps creating exactly these tables when the declared schema moves on.
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _text(name: str) -> sa.Column:
    return sa.Column(name, sa.Text, nullable=False, server_default="")


def _str(name: str, length: int) -> sa.Column:
    return sa.Column(name, sa.String(length), nullable=False, server_default="")


def upgrade() -> None:
    op.create_table(
        "dicom_patient",
        sa.Column("pk", PK, primary_key=True, autoincrement=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        _text("issuer"), _text("patient_name"), _text("patient_name_ci"),
        _text("patient_name_fold"), _text("patient_name_tokens"),
        _str("birth_date", 16), _str("sex", 16),
        sa.Column("fhir_id", sa.String(64), nullable=True),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("ux_dicom_patient_id", "dicom_patient", ["patient_id"], unique=True)

    op.create_table(
        "dicom_study",
        sa.Column("pk", PK, primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("patient_pk", sa.BigInteger, nullable=False),
        _str("study_date", 16), _str("study_time", 32), _str("study_time_key", 16),
        _str("accession_number", 64), _str("study_id", 64), _text("study_description"),
        _text("referring_physician"), _text("referring_physician_ci"),
        _str("timezone_offset", 16), _str("modalities", 256),
        sa.Column("num_series", sa.Integer, nullable=False, server_default="0"),
        sa.Column("num_instances", sa.Integer, nullable=False, server_default="0"),
        sa.Column("fhir_id", sa.String(64), nullable=True),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("ux_dicom_study_uid", "dicom_study", ["study_uid"], unique=True)
    op.create_index("ix_dicom_study_patient", "dicom_study", ["patient_pk"])
    op.create_index("ix_dicom_study_date", "dicom_study", ["study_date", "study_time_key"])
    op.create_index("ix_dicom_study_accession", "dicom_study", ["accession_number"])

    op.create_table(
        "dicom_series",
        sa.Column("pk", PK, primary_key=True, autoincrement=True),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("study_pk", sa.BigInteger, nullable=False),
        _str("modality", 16),
        sa.Column("series_number", sa.Integer, nullable=True),
        _text("series_description"), _str("body_part", 64), _str("laterality", 16),
        _str("series_date", 16), _str("series_time", 32),
        _str("pps_start_date", 16), _str("pps_start_time", 32), _str("pps_start_time_key", 16),
        _str("sps_id", 64), _str("requested_procedure_id", 64),
        sa.Column("num_instances", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("ux_dicom_series_uid", "dicom_series", ["series_uid"], unique=True)
    op.create_index("ix_dicom_series_study", "dicom_series", ["study_pk", "series_number"])
    op.create_index("ix_dicom_series_modality", "dicom_series", ["modality", "study_pk"])

    op.create_table(
        "dicom_instance",
        sa.Column("pk", PK, primary_key=True, autoincrement=True),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("series_pk", sa.BigInteger, nullable=False),
        sa.Column("study_pk", sa.BigInteger, nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer, nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("blob_key", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("pixel_rows", sa.Integer, nullable=True),
        sa.Column("pixel_columns", sa.Integer, nullable=True),
        sa.Column("bits_allocated", sa.Integer, nullable=True),
        sa.Column("number_of_frames", sa.Integer, nullable=True),
        sa.Column("metadata", sa.LargeBinary, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("ux_dicom_instance_uid", "dicom_instance", ["sop_uid"], unique=True)
    op.create_index("ix_dicom_instance_series", "dicom_instance", ["series_pk", "instance_number"])
    op.create_index("ix_dicom_instance_study", "dicom_instance", ["study_pk"])
    op.create_index("ix_dicom_instance_class", "dicom_instance", ["sop_class_uid"])


def downgrade() -> None:
    for table in ("dicom_instance", "dicom_series", "dicom_study", "dicom_patient"):
        op.drop_table(table)
