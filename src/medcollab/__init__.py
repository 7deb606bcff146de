"""medcollab: a medical collaboration platform built around data security and privacy protection."""

__version__ = "0.1.0"
