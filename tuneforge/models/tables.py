"""Every table, imported so that `Base.metadata` knows them all (Alembic and tests use this).

`tuneforge/models/__init__.py` stays empty on purpose: the training recipes import
`tuneforge.models.spec` and must not pull in the database layer.
"""

from tuneforge.db import Base
from tuneforge.models.checkpoint import Artifact, Checkpoint
from tuneforge.models.file import File
from tuneforge.models.job import Job, JobEvent
from tuneforge.models.project import ApiKey, Project
from tuneforge.models.upload import Upload, UploadPart
from tuneforge.models.webhook import WebhookDelivery, WebhookEndpoint

metadata = Base.metadata

__all__ = [
    "ApiKey",
    "Artifact",
    "Checkpoint",
    "File",
    "Job",
    "JobEvent",
    "Project",
    "Upload",
    "UploadPart",
    "WebhookDelivery",
    "WebhookEndpoint",
    "metadata",
]
