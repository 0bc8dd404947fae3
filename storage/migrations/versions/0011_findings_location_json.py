"""findings.location: JSON held in a Text column becomes a JSON column (placeholder)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 17:00:00
"""

from __future__ import annotations

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Placeholder: filled in by the findings.location change."""


def downgrade() -> None:
    """Placeholder: filled in by the findings.location change."""
