"""Alembic environment: resolves the database exactly as medsim does, runs the revisions,
then applies the replaceable objects in sql/ once the database is at head."""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from medsim import db, migrate

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
    # a script for a DBA: the replaceable objects follow the revisions, verbatim
    impl = context.get_context().impl
    impl.static_output(migrate.DROP_VIEWS.strip() + ";")
    for path in migrate.sql_files():
        impl.static_output(f"-- {path.name}\n{path.read_text()}")
    impl.static_output(migrate.stamp_statement() + ";")


def run_migrations_online() -> None:
    engine = create_engine(db.sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        raw = connection.connection.driver_connection
        migrate.take_migration_lock(raw, config.attributes.get("lock_wait_s", migrate.DEFAULT_LOCK_WAIT_S))
        connection.commit()  # the session lock stays; the revisions get clean transactions
        try:
            context.configure(connection=connection, transaction_per_migration=True)
            if context.get_revision_argument() not in ("head", context.get_head_revision()):
                # leaving head (a downgrade, or an upgrade that stops short): what sql/
                # made belongs to head, and would block the revisions' own drops
                with connection.begin():
                    raw.execute(migrate.DROP_REPLACEABLE)
            with context.begin_transaction():
                context.run_migrations()
            # at head (fresh, upgraded, or already there): views, functions, triggers and
            # grants as this code defines them, all in one transaction
            at_head = context.get_context().get_current_revision() == context.get_head_revision()
            connection.commit()  # the read above began a transaction
            if at_head:
                with connection.begin():
                    migrate.apply_sql(raw)
        finally:
            connection.rollback()
            connection.exec_driver_sql(migrate.MIGRATE_UNLOCK)
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
