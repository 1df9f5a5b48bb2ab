"""Alembic environment: resolves the database exactly as medsim does."""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from medsim import db

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# medsim.migrate passes the URL in attributes; the `alembic` command line resolves it.
url = config.attributes.get("url")
if url is None:
    url = db.database_url()


def run_migrations_offline() -> None:
    context.configure(url=db.sqlalchemy_url(url), literal_binds=True, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(db.sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
