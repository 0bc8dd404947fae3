"""outbox: Storage Commitment transaction, request and commit times

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 13:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('commit_transaction_uid', sa.String(length=64),
                                      nullable=True))
        batch_op.add_column(sa.Column('commit_requested_at', sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column('committed_at', sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.create_index('ix_outbox_commit_transaction', ['commit_transaction_uid'],
                              unique=False)
        batch_op.create_index('ix_outbox_commit_due', ['state', 'commit_requested_at'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_commit_due')
        batch_op.drop_index('ix_outbox_commit_transaction')
        batch_op.drop_column('committed_at')
        batch_op.drop_column('commit_requested_at')
        batch_op.drop_column('commit_transaction_uid')
