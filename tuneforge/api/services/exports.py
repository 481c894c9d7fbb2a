"""Which of a job's `export` kinds this installation can make: a GGUF export without llama.cpp's
converter (the `gguf` extra) is refused at creation (400 naming `export`), not failed at the end
of a run. The API and the workers share one image (and `make run` one virtualenv), so what the
API finds installed is what the workers have."""

from __future__ import annotations

from tuneforge.api.errors import BadRequest
from tuneforge.models.spec import JobSpec
from tuneforge.training.gguf import INSTALL_HINT, OUTTYPES, missing_requirements


def check_exports(spec: JobSpec) -> None:
    asked = [kind for kind in spec.export if kind in OUTTYPES]
    if not asked:
        return
    if missing := missing_requirements():
        raise BadRequest(
            f"export {asked[0]!r} needs the GGUF converter, which this service lacks "
            f"({', '.join(missing)}); its administrator installs it with: {INSTALL_HINT}.",
            param="export",
            code="export_not_available",
        )
