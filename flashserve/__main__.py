"""`python -m flashserve` runs the CLI."""

from flashserve.cli import app

app()
