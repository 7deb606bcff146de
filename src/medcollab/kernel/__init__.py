"""Shared vocabulary with no dependencies on the rest of medcollab."""
