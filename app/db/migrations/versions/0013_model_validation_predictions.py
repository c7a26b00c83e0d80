"""model validation predictions

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-25 01:04:30

Each validation image of a model's job as the kept weights predicted it (path, true and predicted
class, calibrated confidence), for finding the most confidently wrong ones. Models registered
before this have none (null).
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('validation', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('validation')
