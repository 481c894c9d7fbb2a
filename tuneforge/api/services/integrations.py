"""Which of a job's `integrations` this service runs: an experiment tracker that the
administrator has not configured is refused at creation (400 naming `integrations[i].type`),
not accepted and dropped on the floor."""

from __future__ import annotations

from tuneforge.api.errors import BadRequest
from tuneforge.config import Settings
from tuneforge.models.spec import JobSpec

_SETTING = {
    "wandb": "TUNEFORGE_WANDB_ENABLED",
    "mlflow": "TUNEFORGE_MLFLOW_TRACKING_URI",
    "tensorboard": "TUNEFORGE_TENSORBOARD_ENABLED",
}


def offered_integrations(settings: Settings) -> set[str]:
    offered = set()
    if settings.wandb_enabled:
        offered.add("wandb")
    if settings.mlflow_tracking_uri:
        offered.add("mlflow")
    if settings.tensorboard_enabled:
        offered.add("tensorboard")
    return offered


def check_integrations(spec: JobSpec, settings: Settings) -> None:
    offered = offered_integrations(settings)
    for i, integration in enumerate(spec.integrations or []):
        kind = integration.type
        if kind not in offered:
            raise BadRequest(
                f"The {kind} integration is not configured on this service (its administrator sets "
                f"{_SETTING[kind]}); offered here: {', '.join(sorted(offered)) or 'none'}.",
                param=f"integrations[{i}].type",
                code="integration_not_configured",
            )
