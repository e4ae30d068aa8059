"""payloads: drop claim-check keys of the format before domain/claim_check.py

The old keys joined the raw ids with '/', which ids may contain, so two
documents could share a prefix (``handbook`` and ``handbook/annex``) and no
key can be mapped back to its document safely. The stages no longer read
them; an event still in flight naming one fails with a reason that says to
publish the document (or index the file) again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_OLD_PREFIXES = ("upload/", "parsed/", "removed/")


def upgrade() -> None:
    payloads = sa.table("payloads", sa.column("key", sa.String))
    for prefix in _OLD_PREFIXES:
        # substr, not LIKE: exact and case-sensitive on every dialect
        op.execute(
            payloads.delete().where(sa.func.substr(payloads.c.key, 1, len(prefix)) == prefix)
        )


def downgrade() -> None:
    """Nothing to restore: the deleted payloads were unreadable garbage."""
