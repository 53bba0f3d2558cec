"""Alembic migrations of the store (run by ``orchestrator.sql.migrate`` at startup)."""
