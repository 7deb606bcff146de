"""The only package that imports ``cryptography`` and ``argon2``.

Everything here is a recipe with one obvious use: hash a password, derive a per-purpose key, seal a
small secret, make a token, issue a TLS certificate. Failures collapse into opaque errors.
"""
