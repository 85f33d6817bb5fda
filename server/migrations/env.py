"""Alembic environment: runs migrations on the connection handed in by server.db.engine.migrate."""
from alembic import context
from sqlalchemy import create_engine

from server.db.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # e.g. `alembic upgrade head` from the command line
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
