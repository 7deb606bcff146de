"""Every table of medcollab, imported in one place so ``Base.metadata`` is complete.

Alembic's autogenerate and ``alembic check`` and the test schema read the metadata from here; a domain
that adds a ``models.py`` adds one line below.
"""

from __future__ import annotations

from medcollab.audit import models as audit_models
from medcollab.db.base import Base
from medcollab.identity import models as identity_models

metadata = Base.metadata

__all__ = ["audit_models", "identity_models", "metadata"]
