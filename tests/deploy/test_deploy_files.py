"""Dockerfile and docker-compose.yml, checked by reading: no Docker engine runs here.

They must agree with Settings (every TUNEFORGE_ variable is a real setting and the production set
validates), with the CLI (every tuneforge service's command parses), and with each other (ports,
hosts, credentials).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tuneforge.cli import build_parser
from tuneforge.config import Settings

ROOT = Path(__file__).resolve().parents[2]
TUNEFORGE_SERVICES = {"migrate", "api", "worker", "beat", "inference"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _resolve(value: str) -> str:
    """Compose interpolation: ${VAR:-default} → default, ${VAR:?err} → a placeholder secret."""
    value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "placeholder-secret", value)


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: _resolve(str(v)) for k, v in (service.get("environment") or {}).items()}


def test_services_are_all_there(compose: dict[str, Any]) -> None:
    assert {"postgres", "redis", "minio", "minio-init"} | TUNEFORGE_SERVICES <= set(compose["services"])


def test_environment_names_real_settings_and_validates(compose: dict[str, Any]) -> None:
    names = {f"TUNEFORGE_{n.upper()}" for n in Settings.model_fields}
    names |= {str(f.validation_alias) for f in Settings.model_fields.values() if f.validation_alias}
    for name in TUNEFORGE_SERVICES:
        env = _env(compose["services"][name])
        unknown = {k for k in env if k.startswith("TUNEFORGE_")} - names
        assert not unknown, f"{name}: {unknown} are not settings"
        settings = Settings.model_validate(
            {k.removeprefix("TUNEFORGE_").lower(): v for k, v in env.items() if k.startswith("TUNEFORGE_")}
        )
        assert settings.environment == "production"
        assert not settings.embedded_broker


def test_urls_point_at_the_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = _env(services["api"])
    db = urlparse(env["TUNEFORGE_DATABASE_URL"])
    pg = _env(services["postgres"])
    assert (db.hostname, db.port) == ("postgres", 5432)
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    assert urlparse(env["TUNEFORGE_BROKER_URL"]).hostname == "redis"
    s3 = urlparse(env["TUNEFORGE_S3_ENDPOINT_URL"])
    assert s3.hostname == "minio" and "9000:9000" in services["minio"]["ports"]
    minio = _env(services["minio"])
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    bucket = urlparse(env["TUNEFORGE_STORAGE_URL"]).netloc
    assert f"local/{bucket}" in " ".join(services["minio-init"]["command"])


def test_commands_are_real_cli_commands_and_ports_agree(
    compose: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    parser = build_parser()
    for name in TUNEFORGE_SERVICES:
        parser.parse_args(compose["services"][name]["command"])  # exits on an unknown command
    api = compose["services"]["api"]
    args = parser.parse_args(api["command"])
    assert args.port == Settings.model_fields["port"].default == 8000
    assert f"{args.port}:{args.port}" in api["ports"]
    assert ("EXPOSE", str(args.port)) in dockerfile
    cmd = next(rest for kw, rest in dockerfile if kw == "CMD")
    parser.parse_args(yaml.safe_load(cmd))


def test_the_api_forwards_to_the_inference_service_where_it_listens(compose: dict[str, Any]) -> None:
    """The API's TUNEFORGE_INFERENCE_ENGINE_URL is the inference service, on the port its command
    listens on (on every interface: other containers reach it), and its health check asks there."""
    services = compose["services"]
    inference = services["inference"]
    args = build_parser().parse_args(inference["command"])
    assert args.handler.__name__ == "_inference" and args.uds is None
    assert args.host == "0.0.0.0"
    engine = urlparse(_env(services["api"])["TUNEFORGE_INFERENCE_ENGINE_URL"])
    assert (engine.scheme, engine.hostname, engine.port) == ("http", "inference", args.port)
    check = " ".join(inference["healthcheck"]["test"])
    assert f"http://127.0.0.1:{args.port}/healthz" in check
    # the engine fetches adapters from the object store the worker wrote them to
    assert _env(inference)["TUNEFORGE_STORAGE_URL"] == _env(services["worker"])["TUNEFORGE_STORAGE_URL"]


@pytest.mark.parametrize("name", ["worker", "inference"])
def test_gpu_services_reserve_a_device(compose: dict[str, Any], name: str) -> None:
    devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_dockerfile_builds_one_image_for_every_role(dockerfile: list[tuple[str, str]]) -> None:
    assert dockerfile[0][0] == "FROM" and "python:3.11" in dockerfile[0][1]
    assert ("ENTRYPOINT", '["tuneforge"]') in dockerfile
    runs = " ".join(rest for kw, rest in dockerfile if kw == "RUN")
    assert "torch==2.13.0" in runs
    for kw, rest in dockerfile:
        if kw == "COPY":
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is missing"
    assert any(kw == "USER" and rest != "root" for kw, rest in dockerfile)


def test_prometheus_scrapes_the_api_and_the_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"] if v.startswith("./")}
    config_path = ROOT / mounts["/etc/prometheus/prometheus.yml"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load(config_path.read_text())
    targets = {
        job["job_name"]: [t for group in job["static_configs"] for t in group["targets"]]
        for job in config["scrape_configs"]
    }
    api_port = build_parser().parse_args(services["api"]["command"]).port
    worker, beat = (
        Settings.model_validate(
            {
                k.removeprefix("TUNEFORGE_").lower(): v
                for k, v in _env(services[n]).items()
                if k.startswith("TUNEFORGE_")
            }
        )
        for n in ("worker", "beat")
    )
    assert worker.worker_metrics_port is not None and beat.beat_metrics_port is not None
    assert targets == {
        "tuneforge-api": [f"api:{api_port}"],
        "tuneforge-worker": [f"worker:{worker.worker_metrics_port}"],
        "tuneforge-beat": [f"beat:{beat.beat_metrics_port}"],
    }
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])


def test_dockerfile_installs_the_gguf_extra_as_the_makefile_does(dockerfile: list[tuple[str, str]]) -> None:
    """The image can export GGUF: the gguf extra compiled with the Makefile's CMAKE_ARGS, and
    llama.cpp's converter installed."""
    makefile = (ROOT / "Makefile").read_text()
    flags = re.search(r"^GGUF_CMAKE_ARGS \?= (.+)$", makefile, re.MULTILINE)
    assert flags is not None
    arg = next(rest for kw, rest in dockerfile if kw == "ARG" and rest.startswith("GGUF_CMAKE_ARGS="))
    assert shlex.split(arg.removeprefix("GGUF_CMAKE_ARGS=")) == [flags.group(1).strip()]
    runs = [rest for kw, rest in dockerfile if kw == "RUN"]
    assert any('CMAKE_ARGS="$GGUF_CMAKE_ARGS"' in r and ".[tracking,gguf]" in r for r in runs), runs
    assert any("install-converter" in r for r in runs), runs


def _settings(service: dict[str, Any]) -> Settings:
    return Settings.model_validate(
        {
            k.removeprefix("TUNEFORGE_").lower(): v
            for k, v in _env(service).items()
            if k.startswith("TUNEFORGE_")
        }
    )


def test_every_long_running_service_is_health_checked_where_it_listens(
    compose: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    """Each service runs the image's HEALTHCHECK (which asks the API's port) unless it has its own:
    the worker, the beat and the engine ask their own ports, and the one-shot migrate has none, so no
    container reads unhealthy for a port it never opens."""
    services = compose["services"]
    image_check = next(rest for kw, rest in dockerfile if kw == "HEALTHCHECK")
    listens = {
        "api": build_parser().parse_args(services["api"]["command"]).port,
        "inference": build_parser().parse_args(services["inference"]["command"]).port,
        "worker": _settings(services["worker"]).worker_metrics_port,
        "beat": _settings(services["beat"]).beat_metrics_port,
    }
    for name, port in listens.items():
        own = services[name].get("healthcheck")
        check = " ".join(own["test"]) if own else image_check
        assert re.search(rf"http://127\.0\.0\.1:{port}/(healthz|metrics)\b", check), (name, check)
    assert services["migrate"]["healthcheck"] == {"disable": True}
