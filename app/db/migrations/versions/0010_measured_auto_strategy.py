"""measured auto strategy

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24 15:00:00

`strategy: "auto"` is decided by a worker that measures candidates: a job keeps "auto" until
then, and `search` holds its options and what was measured. Jobs before this revision were
resolved when created and have none.
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('search', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('search')
