"""Alembic environment of the store.

At run time ``orchestrator.sql.migrate`` hands over an open connection (inside its transaction, under
the migration lock). From a checkout, for writing a new revision against a scratch database:
``alembic -x url=sqlite:///scratch.db upgrade head`` (pyproject.toml says where the scripts are).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from orchestrator.sql.schema import metadata


def run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite runs DDL inside our BEGIN IMMEDIATE; batch mode rebuilds tables for ALTERs it lacks.
        transactional_ddl=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:///scratch.db ...")
    with sa.create_engine(url).begin() as conn:
        run(conn)
