"""job accelerators

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 09:45:00

A job may ask for a GPU or a CPU worker; every job before this revision took any worker.
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('accelerator', sa.String(length=10), nullable=False, server_default='any'))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('accelerator')
