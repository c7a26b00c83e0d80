"""ingest and exports as background work

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 08:26:58

Datasets become background work: `processing` until a worker ingests them, then `ready` or
`failed` (existing datasets are all ready). Exports get rows; an export made before this
revision has none and is built again, by a worker, on its next POST.
"""
import sqlalchemy as sa
from alembic import op

import app.db.tables


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('exports',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('model_id', sa.String(length=40), nullable=False),
    sa.Column('format', sa.String(length=20), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('parity', sa.JSON(), nullable=True),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('claimed_by', sa.String(length=300), nullable=True),
    sa.Column('heartbeat_at', app.db.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('dispatched_at', app.db.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', app.db.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', app.db.tables.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model_id', 'format', name='uq_exports_model_format')
    )
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_exports_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_exports_tenant_id'), ['tenant_id'], unique=False)

    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('archive_bytes', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('error', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', app.db.tables.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('dispatched_at', app.db.tables.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('finished_at', app.db.tables.UTCDateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_datasets_status'), ['status'], unique=False)
    op.execute("UPDATE datasets SET archive_bytes = size_bytes")


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_datasets_status'))
        batch_op.drop_column('finished_at')
        batch_op.drop_column('dispatched_at')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('claimed_by')
        batch_op.drop_column('error')
        batch_op.drop_column('archive_bytes')

    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_exports_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_exports_status'))

    op.drop_table('exports')
