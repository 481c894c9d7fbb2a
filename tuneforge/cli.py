"""The `tuneforge` command. Each sub-command hands over to the room that owns it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tuneforge.config import get_settings


def _models_list(args: argparse.Namespace) -> int:
    from tuneforge.training.base_models import list_base_models

    settings = get_settings()
    for entry in list_base_models(settings.models, settings.models_dir):
        print(f"{entry.id}\t{entry.source}\t{entry.path or '(built on first use)'}")
    return 0


def _models_path(args: argparse.Namespace) -> int:
    from tuneforge.training.base_models import UnknownModel, resolve_model_path

    settings = get_settings()
    try:
        print(resolve_model_path(args.model_id, settings.models, settings.models_dir))
    except UnknownModel:
        print(f"unknown model {args.model_id!r}; see `tuneforge models list`", file=sys.stderr)
        return 2
    return 0


def _worker(args: argparse.Namespace) -> int:
    """A Celery training worker: one job per process, `--concurrency` processes (one per GPU)."""
    import os

    from tuneforge.worker.celery_app import celery_app
    from tuneforge.worker.dispatch import allowed_queues, is_reserved

    settings = get_settings()
    queues = args.queues or settings.default_queue
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if reserved := [q for q in names if is_reserved(q)]:
        print(
            f"reserved queue name(s) {', '.join(reserved)}: a training worker cannot consume them",
            file=sys.stderr,
        )
        return 2
    if unused := sorted(set(names) - allowed_queues(settings)):
        print(
            f"warning: no job can name queue(s) {', '.join(unused)}; add them to TUNEFORGE_WORKER_CLASSES "
            "or TUNEFORGE_JOB_QUEUES",
            file=sys.stderr,
        )
    queues = ",".join(names)
    os.environ["TUNEFORGE_WORKER_QUEUES"] = queues
    if args.devices is not None:  # read by each job's run (tuneforge/worker/launcher.py)
        os.environ["TUNEFORGE_WORKER_DEVICES"] = str(args.devices)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    argv = ["worker", "--queues", queues, "--concurrency", str(args.concurrency), "--pool", "prefork"]
    argv += ["--loglevel", args.loglevel, "--hostname", f"{queues.replace(',', '+')}@%h-{os.getpid()}"]
    argv += ["--without-gossip", "--without-mingle"]
    celery_app.worker_main(argv)
    return 0


def _beat(args: argparse.Namespace) -> int:
    """The reconciler's schedule and the small worker that runs it (queue `control`)."""
    import os

    from tuneforge.worker.celery_app import celery_app

    settings = get_settings()
    os.environ["TUNEFORGE_WORKER_QUEUES"] = "control"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    schedule = settings.data_dir / f"beat-schedule-{os.getpid()}"
    argv = ["worker", "--queues", "control", "--concurrency", "1", "--pool", "solo", "--beat"]
    argv += ["--schedule", str(schedule), "--loglevel", args.loglevel]
    argv += ["--hostname", f"control@%h-{os.getpid()}", "--without-gossip", "--without-mingle"]
    try:
        celery_app.worker_main(argv)
    finally:
        for path in settings.data_dir.glob(f"beat-schedule-{os.getpid()}*"):
            path.unlink(missing_ok=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tuneforge.api.serve import serve

    return serve(args.host, args.port, access_log=args.access_log)


def _inference(args: argparse.Namespace) -> int:
    from tuneforge.inference.server import run_engine

    return run_engine(args.host, args.port, args.uds)


def _migrate(args: argparse.Namespace) -> int:
    from tuneforge.db import migrate

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url, args.revision)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tuning jobs as a service.")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="Base models on offer.")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="List base models.").set_defaults(handler=_models_list)
    path = models_commands.add_parser("path", help="Print a base model's local directory.")
    path.add_argument("model_id")
    path.set_defaults(handler=_models_path)
    worker = commands.add_parser("worker", help="Run a training worker (Celery).")
    worker.add_argument("--queues", default=None, help="Comma-separated queues (GPU classes); default gpu.")
    worker.add_argument("--concurrency", type=int, default=1, help="Jobs at once (one per GPU).")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument(
        "--devices",
        type=int,
        default=None,
        help="Devices a job may use (hardware.count); default every visible GPU, or 1 on CPU.",
    )
    worker.set_defaults(handler=_worker)
    beat = commands.add_parser("beat", help="Run the reconciler's schedule (Celery beat).")
    beat.add_argument("--loglevel", default="INFO")
    beat.set_defaults(handler=_beat)
    serve = commands.add_parser("serve", help="Run the API (and the embedded worker with no broker).")
    serve.add_argument("--host", default=None, help="Interface to listen on (default 127.0.0.1).")
    serve.add_argument("--port", type=int, default=None, help="Port (default 8000).")
    serve.add_argument("--access-log", action="store_true", help="Log every request.")
    serve.set_defaults(handler=_serve)
    inference = commands.add_parser(
        "inference", help="Run the inference engine behind /v1/chat/completions and /v1/completions."
    )
    inference.add_argument("--host", default=None, help="Interface to listen on (default 127.0.0.1).")
    inference.add_argument("--port", type=int, default=None, help="Port (default 8001).")
    inference.add_argument(
        "--uds", default=None, help="A Unix socket instead (default with no TUNEFORGE_INFERENCE_ENGINE_URL)."
    )
    inference.set_defaults(handler=_inference)
    migrate = commands.add_parser("migrate", help="Upgrade the database schema (alembic upgrade).")
    migrate.add_argument("--revision", default="head", help="Target revision (default head).")
    migrate.set_defaults(handler=_migrate)
    from tuneforge.estimates.command import add_parser as add_estimate_parser

    add_estimate_parser(commands)
    from tuneforge.client.commands import add_parsers as add_client_parsers

    add_client_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
