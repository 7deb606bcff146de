"""Every table of medcollab, imported in one place so ``Base.metadata`` is complete.

Alembic's autogenerate and ``alembic check`` and the test schema read the metadata from here; a domain
that adds a ``models.py`` adds one line below.
"""

from __future__ import annotations

from medcollab.access import models as access_models
from medcollab.audit import models as audit_models
from medcollab.collaboration import models as collaboration_models
from medcollab.db.base import Base
from medcollab.identity import models as identity_models
from medcollab.imaging import models as imaging_models
from medcollab.keys import models as keys_models
from medcollab.records import models as records_models

metadata = Base.metadata

__all__ = [
    "access_models",
    "audit_models",
    "collaboration_models",
    "identity_models",
    "imaging_models",
    "keys_models",
    "metadata",
    "records_models",
]
