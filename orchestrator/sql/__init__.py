"""The store's SQL layer: one schema (SQLAlchemy Core) and one migration history (Alembic) for
SQLite and PostgreSQL. ``orchestrator.store`` is the only user."""
