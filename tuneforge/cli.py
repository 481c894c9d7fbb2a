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


def _serve(args: argparse.Namespace) -> int:
    from tuneforge.api.serve import serve

    return serve(args.host, args.port, access_log=args.access_log)


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
    serve = commands.add_parser("serve", help="Run the API (and the embedded worker with no broker).")
    serve.add_argument("--host", default=None, help="Interface to listen on (default 127.0.0.1).")
    serve.add_argument("--port", type=int, default=None, help="Port (default 8000).")
    serve.add_argument("--access-log", action="store_true", help="Log every request.")
    serve.set_defaults(handler=_serve)
    migrate = commands.add_parser("migrate", help="Upgrade the database schema (alembic upgrade).")
    migrate.add_argument("--revision", default="head", help="Target revision (default head).")
    migrate.set_defaults(handler=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
