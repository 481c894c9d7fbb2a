"""The `tuneforge files ...` and `tuneforge jobs ...` client commands: a running service, over HTTP.

Configured by `--api-url`/`--api-key`, else TUNEFORGE_API_URL/TUNEFORGE_API_KEY, else
OPENAI_BASE_URL/OPENAI_API_KEY. `--json` prints the API's objects for scripts; otherwise a short
human summary, with progress bars on stderr. An error is one line on stderr (the API's message),
exit status 1; `jobs watch` exits 0 only when the job succeeded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneforge.client.api import CHUNKED_THRESHOLD, PART_SIZE, Api, ClientError, Config

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
ARTIFACTS = ("adapter", "model", "merged", "gguf")

Handler = Callable[[Api, argparse.Namespace], int]


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api-url", default=None, help="API base URL, e.g. http://127.0.0.1:8000/v1.")
    common.add_argument("--api-key", default=None, help="A project (or the admin) key.")
    common.add_argument("--json", action="store_true", help="Print the API's JSON objects.")
    return common


def add_parsers(commands: Any) -> None:
    """Adds `files` and `jobs` to the `tuneforge` parser's sub-commands."""
    common = _common()
    files = commands.add_parser("files", help="Training files on a running service.")
    files_commands = files.add_subparsers(dest="files_command", required=True)
    upload = files_commands.add_parser(
        "upload",
        parents=[common],
        help="Upload a JSONL file (in parts, through the Uploads API, when large).",
    )
    upload.add_argument("path", type=Path)
    upload.add_argument("--purpose", default="fine-tune")
    upload.add_argument(
        "--chunked-threshold",
        type=int,
        default=CHUNKED_THRESHOLD,
        help=f"Bytes above which the file goes in parts (default {CHUNKED_THRESHOLD}).",
    )
    upload.add_argument(
        "--part-size", type=int, default=PART_SIZE, help=f"Bytes a part (default {PART_SIZE})."
    )
    _bind(upload, _files_upload)

    jobs = commands.add_parser("jobs", help="Fine-tuning jobs on a running service.")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    create = jobs_commands.add_parser(
        "create", parents=[common], help="Create a job from flags, or from --spec (flags override it)."
    )
    create.add_argument("--spec", type=Path, default=None, help="A create-job body as a JSON file.")
    create.add_argument("--model", default=None, help="A base model id, or an ft: model to continue from.")
    create.add_argument("--training-file", default=None, help="A file id, or a local JSONL path to upload.")
    create.add_argument("--validation-file", default=None, help="A file id, or a local JSONL path to upload.")
    create.add_argument("--suffix", default=None)
    create.add_argument("--seed", type=int, default=None)
    create.add_argument("--method", default=None, help="supervised, dpo, pretraining, ...")
    create.add_argument("--n-epochs", type=int, default=None)
    create.add_argument("--batch-size", type=int, default=None)
    create.add_argument("--learning-rate-multiplier", type=float, default=None)
    create.add_argument("--learning-rate", type=float, default=None)
    create.add_argument("--max-steps", type=int, default=None)
    create.add_argument(
        "--adapter", default=None, help="lora, qlora, dora, prefix_tuning, prompt_tuning, ia3, full."
    )
    create.add_argument("--r", type=int, default=None, help="LoRA rank.")
    create.add_argument("--alpha", type=float, default=None, help="LoRA alpha.")
    create.add_argument("--export", default=None, help="Comma-separated: merged, gguf, gguf_q8_0.")
    create.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    _bind(create, _jobs_create)

    listing = jobs_commands.add_parser("list", parents=[common], help="List jobs, newest first.")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--after", default=None, help="A job id: the page starts after it.")
    _bind(listing, _jobs_list)
    get = jobs_commands.add_parser("get", parents=[common], help="Show one job.")
    get.add_argument("job_id")
    _bind(get, _jobs_get)
    events = jobs_commands.add_parser("events", parents=[common], help="A job's events, oldest first.")
    events.add_argument("job_id")
    events.add_argument("--limit", type=int, default=50)
    events.add_argument("--after", default=None, help="An event id: the page starts after it.")
    _bind(events, _jobs_events)
    for action in ("cancel", "pause", "resume"):
        sub = jobs_commands.add_parser(action, parents=[common], help=f"{action.capitalize()} a job.")
        sub.add_argument("job_id")
        _bind(sub, _action(action))
    watch = jobs_commands.add_parser(
        "watch", parents=[common], help="Follow a job until it ends; exit 0 only when it succeeded."
    )
    watch.add_argument("job_id")
    watch.add_argument("--interval", type=float, default=1.0, help="Seconds between polls.")
    _bind(watch, _jobs_watch)
    download = jobs_commands.add_parser(
        "download", parents=[common], help="Download an artifact, check its sha256 and unpack it."
    )
    download.add_argument("job_id")
    download.add_argument("--artifact", default="adapter", help=f"{', '.join(ARTIFACTS)} (default adapter).")
    download.add_argument("-o", "--output", type=Path, required=True, help="The directory to unpack into.")
    _bind(download, _jobs_download)


def _bind(parser: argparse.ArgumentParser, handler: Handler) -> None:
    def run(args: argparse.Namespace) -> int:
        try:
            with Api(Config.resolve(args.api_url, args.api_key)) as api:
                return handler(api, args)
        except ClientError as exc:
            print(f"tuneforge: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("tuneforge: interrupted", file=sys.stderr)
            return 130

    parser.set_defaults(handler=run)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _bar(total: int | None, desc: str, unit: str = "B", enabled: bool = True) -> Any:
    from tqdm import tqdm

    scale = unit == "B"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        file=sys.stderr,
        disable=not enabled or None,  # None: off when stderr is not a terminal
        dynamic_ncols=True,
    )


def _when(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


# --- files ---
def _upload(api: Api, path: Path, args: argparse.Namespace, purpose: str = "fine-tune") -> dict[str, Any]:
    if not path.is_file():
        raise ClientError(f"no such file: {path}")
    with _bar(path.stat().st_size, f"upload {path.name}", enabled=not args.json) as bar:
        return api.upload_file(
            path,
            purpose=purpose,
            chunked_threshold=getattr(args, "chunked_threshold", CHUNKED_THRESHOLD),
            part_size=getattr(args, "part_size", PART_SIZE),
            on_bytes=bar.update,
        )


def _files_upload(api: Api, args: argparse.Namespace) -> int:
    file = _upload(api, args.path, args, args.purpose)
    if args.json:
        _print_json(file)
    else:
        print(f"{file['id']}\t{file['filename']}\t{file['bytes']} bytes")
    return 0


# --- jobs ---
def _file_id(api: Api, value: str | None, args: argparse.Namespace) -> str | None:
    if value is None or value.startswith("file-") or not Path(value).is_file():
        return value
    return str(_upload(api, Path(value), args)["id"])


def _job_body(api: Api, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.spec is not None:
        try:
            body = json.loads(args.spec.read_text())
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot read the spec {args.spec}: {exc}") from None
        if not isinstance(body, dict):
            raise ClientError(f"the spec {args.spec} must hold a JSON object")
    for name in ("model", "suffix", "seed"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    for name in ("training_file", "validation_file"):
        value = _file_id(api, getattr(args, name) or body.get(name), args)
        if value is not None:
            body[name] = value
    method = body.setdefault("method", {"type": "supervised"})
    if args.method is not None:
        method["type"] = args.method
    kind = method.setdefault("type", "supervised")
    hyperparameters = method.setdefault(kind, {}).setdefault("hyperparameters", {})
    for name in ("n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate", "max_steps"):
        if getattr(args, name) is not None:
            hyperparameters[name] = getattr(args, name)
    adapter = dict(body.get("adapter") or {})
    if args.adapter is not None:
        adapter["type"] = args.adapter
    if args.r is not None:
        adapter["r"] = args.r
    if args.alpha is not None:
        adapter["alpha"] = args.alpha
    if adapter:
        body["adapter"] = adapter
    if args.export is not None:
        body["export"] = [e.strip() for e in args.export.split(",") if e.strip()]
    if args.metadata:
        metadata = dict(body.get("metadata") or {})
        for item in args.metadata:
            key, sep, value = item.partition("=")
            if not sep:
                raise ClientError(f"--metadata wants KEY=VALUE, not {item!r}")
            metadata[key] = value
        body["metadata"] = metadata
    for required in ("model", "training_file"):
        if not body.get(required):
            raise ClientError(f"--{required.replace('_', '-')} is required (or set it in --spec)")
    return body


def _job_line(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    step = f"{progress.get('step')}/{progress.get('total_steps')}" if progress.get("total_steps") else "-"
    adapter = (job.get("adapter") or {}).get("type", "-")
    method = (job.get("method") or {}).get("type", "-")
    return "\t".join(
        [job["id"], job["status"], job["model"], method, adapter, step, _when(job.get("created_at"))]
    )


def _show_job(job: dict[str, Any]) -> None:
    print(_job_line(job))
    if job.get("fine_tuned_model"):
        print(f"fine_tuned_model: {job['fine_tuned_model']}")
    if job.get("error"):
        print(f"error: {job['error'].get('code')}: {job['error'].get('message')}")


def _jobs_create(api: Api, args: argparse.Namespace) -> int:
    job = api.create_job(_job_body(api, args))
    if args.json:
        _print_json(job)
    else:
        _show_job(job)
    return 0


def _jobs_list(api: Api, args: argparse.Namespace) -> int:
    page = api.list_jobs(args.limit, args.after)
    if args.json:
        _print_json(page)
    else:
        for job in page["data"]:
            print(_job_line(job))
    return 0


def _jobs_get(api: Api, args: argparse.Namespace) -> int:
    job = api.get_job(args.job_id)
    if args.json:
        _print_json(job)
    else:
        _show_job(job)
    return 0


def _jobs_events(api: Api, args: argparse.Namespace) -> int:
    page = api.events(args.job_id, args.limit, args.after)
    if args.json:
        _print_json(page)
    else:
        for event in reversed(page["data"]):
            print(f"{_when(event['created_at'])}\t{event['level']}\t{event['message']}")
    return 0


def _action(action: str) -> Handler:
    def run(api: Api, args: argparse.Namespace) -> int:
        job = api.job_action(args.job_id, action)
        if args.json:
            _print_json(job)
        else:
            _show_job(job)
        return 0

    return run


def _new_events(api: Api, job_id: str, seen: set[str]) -> list[dict[str, Any]]:
    """Events not shown yet, oldest first (the API lists newest first)."""
    page = api.events(job_id, limit=100)
    fresh = [event for event in page["data"] if event["id"] not in seen]
    seen.update(event["id"] for event in fresh)
    return list(reversed(fresh))


def _progress_line(job: dict[str, Any], loss: float | None) -> str:
    progress = job.get("progress") or {}
    parts = [job["status"]]
    if progress.get("total_steps"):
        parts.append(f"step {progress.get('step') or 0}/{progress['total_steps']}")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if progress.get("eta_seconds") is not None:
        parts.append(f"ETA {float(progress['eta_seconds']):.0f}s")
    return "  ".join(parts)


def _jobs_watch(api: Api, args: argparse.Namespace) -> int:
    """Polls the job and its events until a final status: a progress bar of steps with the last
    training loss and the ETA, and each new event's message above it. Where stderr is no terminal
    (a log, a pipe), a line with the step, loss and ETA each time the step or status changes."""
    from tqdm import tqdm

    seen: set[str] = set()
    loss: float | None = None
    plain = not args.json and not sys.stderr.isatty()
    printed: tuple[str, Any] | None = None
    with _bar(None, args.job_id, unit="step", enabled=not args.json) as bar:
        while True:
            job = api.get_job(args.job_id)
            for event in _new_events(api, args.job_id, seen):
                data = event.get("data") or {}
                if data.get("train_loss") is not None:
                    loss = float(data["train_loss"])
                if not args.json and event.get("type") != "metrics":
                    tqdm.write(f"{_when(event['created_at'])}  {event['message']}", file=sys.stderr)
            progress = job.get("progress") or {}
            if progress.get("total_steps"):
                bar.total = progress["total_steps"]
                bar.n = progress.get("step") or 0
            postfix = {"status": job["status"]}
            if loss is not None:
                postfix["loss"] = f"{loss:.4f}"
            if progress.get("eta_seconds") is not None:
                postfix["eta"] = f"{float(progress['eta_seconds']):.0f}s"
            bar.set_postfix(postfix, refresh=True)
            if plain and printed != (job["status"], progress.get("step")):
                printed = (job["status"], progress.get("step"))
                print(_progress_line(job, loss), file=sys.stderr, flush=True)
            if job["status"] in FINAL_STATUSES:
                break
            time.sleep(args.interval)
    if args.json:
        _print_json(job)
    else:
        _show_job(job)
    return 0 if job["status"] == "succeeded" else 1


def _jobs_download(api: Api, args: argparse.Namespace) -> int:
    artifacts = {artifact["name"]: artifact for artifact in api.artifacts(args.job_id)}
    artifact = artifacts.get(args.artifact)
    if artifact is None:
        have = ", ".join(sorted(artifacts)) or "none yet"
        raise ClientError(f"job {args.job_id} has no artifact '{args.artifact}' (it has: {have})")
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    gzip = artifact.get("content_type") == "application/gzip"
    target = out / (f"{args.job_id}-{args.artifact}.tar.gz" if gzip else f"{args.job_id}-{args.artifact}")
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with (
            api.artifact_stream(args.job_id, args.artifact) as response,
            partial.open("wb") as handle,
            _bar(artifact.get("bytes"), f"download {args.artifact}", enabled=not args.json) as bar,
        ):
            for chunk in response.iter_bytes(1 << 20):
                handle.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        expected = artifact.get("sha256")
        if expected and digest.hexdigest() != expected:
            raise ClientError(f"sha256 mismatch: got {digest.hexdigest()}, the service lists {expected}")
        files: list[str]
        if gzip:
            with tarfile.open(partial, "r:gz") as archive:
                files = [member.name for member in archive.getmembers() if member.isfile()]
                archive.extractall(out, filter="data")
            partial.unlink()
        else:
            partial.replace(target)
            files = [target.name]
    except (tarfile.TarError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise ClientError(f"cannot unpack {args.artifact} into {out}: {exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    summary = {
        "job_id": args.job_id,
        "artifact": args.artifact,
        "bytes": artifact.get("bytes"),
        "sha256": digest.hexdigest(),
        "path": str(out.resolve()),
        "files": sorted(files),
    }
    if args.json:
        _print_json(summary)
    else:
        print(
            f"{args.artifact} of {args.job_id}: sha256 {digest.hexdigest()} checked; "
            f"{len(files)} files in {out}"
        )
    return 0
