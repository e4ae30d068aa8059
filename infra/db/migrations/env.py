"""Alembic environment: kbstream passes its own connection (infra/db/engine.py)."""

from alembic import context
from sqlalchemy import create_engine

from infra.db.models import Base

config = context.config
target_metadata = Base.metadata

connection = config.attributes.get("connection")
if connection is None:
    # `alembic -x url=... revision --autogenerate` from a developer's shell
    url = context.get_x_argument(as_dictionary=True).get("url", "sqlite:///:memory:")
    connection = create_engine(url).connect()

context.configure(
    connection=connection,
    target_metadata=target_metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
