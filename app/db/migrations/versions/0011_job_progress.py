"""job progress within an epoch

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24 19:30:00

Where a running job is within its current phase (decoding, searching, features, training,
validation): step of steps, images per second and the estimated seconds left, as its worker
last reported them.
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('progress', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('progress')
