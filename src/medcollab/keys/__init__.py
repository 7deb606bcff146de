"""The data-key store: per-patient and per-organisation data keys, wrapped by a key provider.

:class:`~medcollab.keys.services.KeyService` creates, finds, rotates and destroys data keys;
:mod:`medcollab.crypto.envelope` seals data with them; :mod:`medcollab.crypto.providers` holds the
key-encryption keys. ``docs/security/crypto.md`` describes the whole hierarchy.
"""
