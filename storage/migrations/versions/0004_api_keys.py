"""api keys and the API's filter indexes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 04:53:31.290183
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_prefix'), ['prefix'], unique=False)

    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.create_index('ix_findings_created', ['created_at'], unique=False)
        batch_op.create_index('ix_findings_model_id', ['model_name', 'id'], unique=False)
        batch_op.create_index('ix_findings_present_id', ['present', 'id'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_finished', ['finished_at'], unique=False)
        batch_op.create_index('ix_jobs_model_id', ['model_name', 'id'], unique=False)
        batch_op.create_index('ix_jobs_state_id', ['state', 'id'], unique=False)

    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_state_destination', ['state', 'destination', 'created_at'],
                              unique=False)

    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index('ix_studies_accession', ['accession_number'], unique=False)
        batch_op.create_index('ix_studies_study_date', ['study_date'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index('ix_studies_study_date')
        batch_op.drop_index('ix_studies_accession')

    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_state_destination')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state_id')
        batch_op.drop_index('ix_jobs_model_id')
        batch_op.drop_index('ix_jobs_finished')

    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.drop_index('ix_findings_present_id')
        batch_op.drop_index('ix_findings_model_id')
        batch_op.drop_index('ix_findings_created')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_prefix'))

    op.drop_table('api_keys')
