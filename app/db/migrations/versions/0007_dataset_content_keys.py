"""dataset content keys

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 09:00:00

A ready dataset's images live under an object-store prefix named after their content
(`datasets/<sha256>`). Datasets ingested before this revision keep their directory, named after
their id: their key says so.
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('content_key', sa.String(length=100), nullable=True))
        batch_op.create_index(batch_op.f('ix_datasets_content_key'), ['content_key'], unique=False)
    op.execute("UPDATE datasets SET content_key = 'datasets/' || id WHERE status = 'ready'")


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_datasets_content_key'))
        batch_op.drop_column('content_key')
