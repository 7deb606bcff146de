"""The audit log: typed security events, appended inside the caller's unit of work.

This is the seam every domain appends through (:class:`~medcollab.audit.services.AuditLog`). The
tamper-evident Merkle tree, signed tree heads and verification build on the same table.
"""
