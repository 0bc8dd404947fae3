"""findings: out-of-distribution score and flag of the finding's input images

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ood_score', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('out_of_distribution', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.drop_column('out_of_distribution')
        batch_op.drop_column('ood_score')
