"""Alembic's entry point for the user-data migrations: runs them on the connection that
``userdata.migrations.upgrade`` passes in ``config.attributes["connection"]`` (online only; there
is no offline SQL mode and no alembic.ini)."""

from alembic import context

from userdata.migrations import VERSION_TABLE
from userdata.schema import METADATA

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the user-data migrations through userdata.migrations.upgrade (the studio does it at start)")
context.configure(connection=connection, target_metadata=METADATA, version_table=VERSION_TABLE,
                  render_as_batch=connection.dialect.name == "sqlite", transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
