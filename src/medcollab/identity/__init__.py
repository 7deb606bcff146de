"""Identity: organisations, users, memberships, authentication, MFA and sessions."""
