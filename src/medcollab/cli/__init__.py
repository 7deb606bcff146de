"""The operator CLI (Typer + Rich)."""
