"""payloads: claim-check keys move to the format of domain/claim_check.py

The old keys joined the raw ids with '/', which ids may contain, so two
documents could share a prefix (``handbook`` and ``handbook/annex``). A key
whose ids held no '/' has exactly its format's number of parts and maps to
one document for certain: it moves to the new key, so an upgrade with work in
flight keeps its uploads, parsed texts and owed removals (and
domain/claim_check.py still accepts the old name of such a key in an event in
flight). A key with more parts cannot be mapped back safely and is deleted;
an event naming it fails with a reason that says to publish again.

The key format is written out here, not imported: a migration must keep
doing what it did when later code changes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 00:00:00
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# prefix -> number of '/'-separated parts of an unambiguous old key
_OLD_PARTS = {"upload/": 5, "parsed/": 5, "removed/": 5}


def _digest(component: str) -> str:
    return hashlib.sha256(component.encode()).hexdigest()[:32]


def _new_key(old: str) -> str | None:
    parts = old.split("/")
    if len(parts) != _OLD_PARTS[parts[0] + "/"] or not all(parts):
        return None
    kind, tenant, dataset, document, rest = parts
    base = f"cc/{_digest(tenant)}/{_digest(dataset)}/{_digest(document)}/"
    if kind == "removed":
        return f"{base}removed"  # the old key was removed/<t>/<d>/<doc>/ids
    return f"{base}{kind}/{rest}"


def upgrade() -> None:
    payloads = sa.table("payloads", sa.column("key", sa.String))
    conn = op.get_bind()
    for prefix in _OLD_PARTS:
        # substr, not LIKE: exact and case-sensitive on every dialect
        old_keys = (
            conn.execute(
                sa.select(payloads.c.key).where(
                    sa.func.substr(payloads.c.key, 1, len(prefix)) == prefix
                )
            )
            .scalars()
            .all()
        )
        for old in old_keys:
            new = _new_key(old)
            if new is None:
                conn.execute(payloads.delete().where(payloads.c.key == old))
            else:
                conn.execute(payloads.delete().where(payloads.c.key == new))
                conn.execute(payloads.update().where(payloads.c.key == old).values(key=new))


def downgrade() -> None:
    """The old format cannot name every key of the new one; nothing to undo."""
