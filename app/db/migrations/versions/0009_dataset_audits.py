"""dataset audits

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 13:55:00

A dataset's audit (duplicates, likely mislabelled images, confused classes, outliers), computed by
a background worker and kept, one per dataset and backbone.
"""
import sqlalchemy as sa
from alembic import op

import app.db.tables

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'audits',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('tenant_id', sa.String(length=40), nullable=False),
        sa.Column('dataset_id', sa.String(length=40), nullable=False),
        sa.Column('backbone', sa.String(length=200), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('result', sa.JSON(), nullable=True),
        sa.Column('error', sa.JSON(), nullable=True),
        sa.Column('claimed_by', sa.String(length=300), nullable=True),
        sa.Column('heartbeat_at', app.db.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column('dispatched_at', app.db.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column('created_at', app.db.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column('finished_at', app.db.tables.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='RESTRICT'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('dataset_id', 'backbone', name='uq_audits_dataset_backbone'),
    )
    with op.batch_alter_table('audits', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audits_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_audits_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_table('audits')
