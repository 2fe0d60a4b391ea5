"""Alembic migrations of the accounts database (run by `accounts.db.migrate`)."""
