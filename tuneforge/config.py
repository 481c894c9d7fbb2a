"""Settings: one pydantic-settings object, read from `TUNEFORGE_*` environment variables.

The defaults are the embedded set-up of `make run`: SQLite, a filesystem object store and an
embedded broker, all under the data directory. Production points the same fields at PostgreSQL,
Redis and S3.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    environment: Literal["development", "production"] = Field(
        "development", description="`production` refuses generated secrets and embedded services."
    )
    data_dir: Path = Field(Path("./.tuneforge"), description="Root of every embedded default.")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite under data_dir.")
    broker_url: str = Field("", description="Celery broker URL; empty means the embedded broker.")
    storage_url: str = Field("", description="`file:///path` or `s3://bucket/prefix`.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto); None is AWS.")
    s3_public_endpoint_url: str | None = Field(
        None,
        description="The S3 endpoint clients reach, named in download URLs (`?redirect=true`). With a "
        "private s3_endpoint_url and none here, the API streams downloads itself.",
    )
    s3_presign_expires_seconds: int = Field(
        300, ge=1, le=7 * 24 * 3600, description="How long a download URL handed to a client works."
    )
    s3_presign_access_key_id: str | None = Field(
        None,
        description="A read-only key pair to sign download URLs with (a URL shows its key id); "
        "default: the service's own credentials.",
    )
    s3_presign_secret_access_key: SecretStr | None = Field(None, description="Its secret.")
    admin_key: SecretStr | None = Field(None, description="Admin bearer key; generated when unset.")
    models: str = Field("", description="Extra base models on offer: `id=/path,id2=/path2`.")
    trust_remote_code: bool = Field(False, description="Allow models whose code ships with them.")
    max_upload_bytes: int = Field(1 << 30, description="Uploads larger than this answer 413.")
    max_upload_line_bytes: int = Field(
        8 << 20, ge=1, description="A JSONL line longer than this refuses the upload (400 naming the line)."
    )
    upload_idle_timeout_seconds: float = Field(
        30.0, gt=0, description="An upload that sends nothing for this long is refused (408)."
    )
    max_concurrent_uploads_per_project: int = Field(
        4, ge=1, description="Uploads one project may run at once per API process; one more is a 429."
    )
    max_chunked_upload_bytes: int = Field(
        8 << 30,
        ge=1,
        description="The largest file the Uploads API (POST /v1/uploads, sent in parts) takes; a "
        "larger `bytes` is a 413.",
    )
    chunked_upload_expires_seconds: int = Field(
        3600, ge=60, description="An Uploads API upload not completed this long after its creation expires."
    )
    incomplete_write_max_age_seconds: float = Field(
        24 * 3600.0,
        gt=0,
        description="The API removes what writes killed part-way left in the object store (temporary "
        "files, S3 multipart uploads) once they are this old: at start-up, then hourly.",
    )
    api_threads: int = Field(
        8,
        ge=1,
        le=256,
        description="Threads that run database work in one API process. Few threads contend less "
        "for the interpreter lock: lower tail latency than many.",
    )
    api_key_cache_seconds: float = Field(
        10.0,
        ge=0,
        description="How long an API process trusts a project key it has checked (0: always ask the "
        "database). A key revoked through another API process stops working within this time.",
    )
    models_dir_override: Path | None = Field(
        None,
        validation_alias="TUNEFORGE_MODELS_DIR",
        description="Where built and cached base models live; default <data_dir>/models.",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    # --- job execution (worker) ---
    default_queue: str = Field("gpu", description="Worker queue for jobs whose spec names none.")
    worker_classes: str = Field(
        "",
        description="Device memory per worker queue in GiB, `gpu=80,small=24`: each new job is "
        "estimated against it and refused when it fits none (see refuse_unfit_jobs).",
    )
    refuse_unfit_jobs: bool = Field(
        True, description="Refuse a job whose estimate fits no worker class (with worker_classes set)."
    )
    job_queues: str = Field(
        "",
        description="More worker queues a job may name (comma-separated), besides default_queue and "
        "the worker_classes queues; any other `queue` is a 400. Reserved names (control, celery*, "
        "kombu's unacked*, _kombu*) are never accepted.",
    )
    lease_seconds: float = Field(60.0, gt=0, description="A running job's lease; renewed while it runs.")
    max_attempts: int = Field(3, ge=1, description="Runs of a job (after lost workers) before it fails.")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept per job (the newest).")
    checkpoint_retention_days: float = Field(
        30.0,
        ge=0,
        description="Checkpoints of failed and cancelled jobs are deleted this long after the job "
        "ended (0 keeps them forever). Succeeded jobs keep theirs.",
    )
    reconcile_every_seconds: float = Field(15.0, gt=0, description="How often the reconciler runs.")
    queued_stale_seconds: float = Field(
        120.0, gt=0, description="A queued job with no run started this long is sent to the broker again."
    )
    broker_visibility_timeout: int = Field(
        3600, ge=1, description="Redis: seconds before an unacknowledged task message is redelivered."
    )
    broker_key_prefix: str = Field(
        "tuneforge:",
        description="Redis: prefix of every key the broker writes (queues and kombu's own), so the "
        "service's keys never mix with others' in a shared Redis database.",
    )
    worker_proc_alive_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a new worker pool process has to report up before Celery kills it and "
        "starts another. Measured: about 1 s on a busy 2-core machine (the heavy warm-up runs after "
        "the report); Celery's own default, 4 s, is too short under load.",
    )
    worker_fork_server: bool = Field(
        True,
        description="Training processes are forks of one process per worker that imports the "
        "training stack once (tuneforge/worker/forkserver.py), not fresh interpreters that each "
        "import it (about 10 CPU-seconds per job on a CPU). It steps aside by itself where forking "
        "is unsafe (CUDA initialised by an import, as on a GPU machine). It holds the imported "
        "stack, about 0.5 GB resident per worker. False: fresh interpreters always.",
    )
    worker_devices: int | None = Field(
        None,
        ge=1,
        description="Devices this worker trains on (`tuneforge worker --devices N`); a job whose "
        "hardware.count is larger waits for another worker. Default: every visible GPU, or 1 on CPU.",
    )
    worker_cpu_processes: bool = Field(
        False,
        description="Let a CPU worker run a job as hardware.count gloo processes (up to worker_devices): "
        "for tests and benchmarks of multi-device training without GPUs.",
    )
    distributed_ready_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="Seconds every rank of a multi-device run has, from torchrun's start, to join the "
        "rendezvous, import the training stack and report ready to its worker (measured: under a "
        "minute for 2 CPU ranks on a loaded 2-core machine). A run whose ranks are not all ready "
        "is stopped and started again like one that lost a rank, then fails naming what was missing.",
    )
    worker_shutdown_grace_seconds: float = Field(
        25.0,
        gt=0,
        description="On SIGTERM a worker checkpoints its running job, hands it back to its queue and "
        "exits within this time (keep it under the orchestrator's own grace period, 30 s in "
        "Kubernetes). A checkpoint that cannot be made in time is skipped: the job resumes from "
        "its previous one.",
    )
    work_dir_override: Path | None = Field(
        None, validation_alias="TUNEFORGE_WORK_DIR", description="Scratch space of training runs."
    )
    tokenization_cache: bool = Field(
        True,
        description="Keep tokenized datasets in the object store (tokcache/), keyed by the file's "
        "sha256, the tokenizer, chat template, max_seq_length, method and format, and reuse them in "
        "validation, training, resumed attempts and later jobs on the same file.",
    )
    test_oom_above_micro_batch: int | None = Field(
        None,
        ge=0,
        description="TEST ONLY, never in production: the training process raises "
        "torch.OutOfMemoryError at every step whose micro-batch is above this size (0: every "
        "step), so tests drive the out-of-memory recovery on machines without a GPU.",
    )
    test_oom_after_step: int | None = Field(
        None,
        ge=0,
        description="TEST ONLY, never in production: with test_oom_above_micro_batch, the injected "
        "error strikes only once this many optimizer steps of the run are done (so a checkpoint "
        "saved at that step comes first); unset: from the first step.",
    )
    # --- quotas and limits (tuneforge.api.quotas, tuneforge.estimates.ceilings) ---
    max_active_jobs_per_project: int = Field(
        0,
        ge=0,
        description="Jobs a project may have that have not finished (validating_files, queued, "
        "running, paused); creating one more is a 429. 0: unlimited.",
    )
    max_stored_bytes_per_project: int = Field(
        0,
        ge=0,
        description="Bytes of uploaded files a project may keep; an upload past it is a 413. 0: unlimited.",
    )
    rate_limit_per_minute: float = Field(
        0.0,
        ge=0,
        description="Requests per minute one project key may make to one API process (a token bucket "
        "in each process; N processes allow N times this). Past it: 429 with Retry-After. 0: off.",
    )
    rate_limit_burst: int = Field(
        0,
        ge=0,
        description="Requests a key may make at once before the per-minute rate applies; 0: the rate.",
    )
    max_job_steps: int = Field(
        1_000_000,
        ge=0,
        description="Most optimizer steps a job may plan (new, resumed or continued). 0: no ceiling.",
    )
    max_job_hours: float = Field(
        720.0,
        ge=0,
        description="Most hours a job's estimate may say it takes (when the estimate has a time). "
        "0: no ceiling.",
    )
    estimate_build_seconds: float = Field(
        15.0,
        ge=0,
        description="Time budget of the model skeleton builds of one estimate (the API's CPU); past "
        "it an estimate request is a 400 and a job being created is stored without its estimate. "
        "0: no budget.",
    )
    estimate_concurrent_builds: int = Field(
        2,
        ge=0,
        description="Threads of one API process that may build model skeletons for estimates (or wait "
        "for one) at once; one more is a 503 with Retry-After. Estimates of models built before "
        "need none. 0: no limit.",
    )
    # --- inference (tuneforge.inference, api/routes/chat.py) ---
    inference_engine_url: str = Field(
        "",
        description="Where the API reaches the built-in inference engine (`tuneforge inference`), "
        "e.g. `http://inference:8001`; empty: the engine embedded mode starts on the Unix socket "
        "<data_dir>/inference.sock.",
    )
    inference_url: str | None = Field(
        None,
        description="An existing vLLM server (OpenAI-compatible, started with --enable-lora and "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) to serve instead of the built-in engine; adapters are "
        "handed to it through its /v1/load_lora_adapter.",
    )
    inference_adapter_dir: Path | None = Field(
        None,
        description="With inference_url: a directory the vLLM server reads too, where the API unpacks "
        "adapters before asking vLLM to load them; default <data_dir>/served-adapters.",
    )
    inference_adapters_per_base: int = Field(
        8, ge=1, description="Adapters the engine keeps loaded per base model (least recently used go)."
    )
    inference_full_models: int = Field(
        2,
        ge=1,
        description="Fully fine-tuned models the engine keeps loaded (each a whole model in memory); "
        "past that the least recently used idle one is unloaded.",
    )
    inference_max_batch: int = Field(
        32, ge=1, description="Sequences the engine decodes together in one batch (over adapters)."
    )
    inference_max_queued: int = Field(
        256,
        ge=1,
        description="Sequences (requests times n) an engine process holds, waiting or running; one "
        "more request is a 429.",
    )
    inference_timeout_seconds: float = Field(
        120.0, gt=0, description="A completion still unfinished after this long is stopped (504)."
    )
    inference_max_tokens: int = Field(
        512, ge=1, description="Tokens a completion generates when the request sets no max_tokens."
    )
    # --- webhooks and live events (tuneforge.models.webhook, tuneforge.worker.webhooks) ---
    webhook_allow_hosts: str = Field(
        "",
        description="Hosts (names, IP addresses or networks such as 10.0.0.0/8, comma-separated) a "
        "webhook endpoint may name even over plain http or at a private or loopback address; any "
        "other endpoint must be https to a public address.",
    )
    webhook_retry_seconds: str = Field(
        "5,30,120,600,1800,3600,7200,14400,28800,28800",
        description="Delays between the attempts of a webhook delivery (comma-separated seconds, each "
        "stretched by up to 20% of jitter); after the last the delivery has failed.",
    )
    webhook_give_up_seconds: float = Field(
        24 * 3600.0, gt=0, description="A webhook delivery not made this long after its event has failed."
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="How long one webhook attempt may take (connect, send, answer)."
    )
    webhook_send_every_seconds: float = Field(
        2.0, gt=0, description="How often the beat process sends the webhook deliveries that are due."
    )
    event_stream_heartbeat_seconds: float = Field(
        15.0,
        gt=0,
        description="A live event stream sends a `: ping` comment after this many seconds without an event, "
        "so proxies keep it open.",
    )
    # --- graders (tuneforge.graders: the graders API and evaluations inside jobs) ---
    python_grader_enabled: bool = Field(
        False,
        description="Run `python` graders (the user's grade(sample, item) in a sandboxed process with "
        "no network and time, memory and output limits); off: they validate but running one is a 400.",
    )
    python_grader_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="CPU and wall-clock time one python grader run may take."
    )
    python_grader_memory_mb: int = Field(
        512, ge=64, le=65536, description="Address space one python grader process may use (MiB)."
    )
    grader_model_url: str | None = Field(
        None,
        description="OpenAI-compatible base URL (e.g. `http://127.0.0.1:8000/v1`, Tuneforge's own) whose "
        "/chat/completions `score_model` and `label_model` graders call; unset: they are a 400.",
    )
    grader_model_key: SecretStr | None = Field(None, description="Bearer key for grader_model_url.")
    grader_model_timeout_seconds: float = Field(
        60.0, gt=0, le=600, description="How long one model grader call may take."
    )

    @field_validator("webhook_retry_seconds")
    @classmethod
    def _check_retry_seconds(cls, value: str) -> str:
        _parse_delays(value)
        return value

    @property
    def webhook_retry_delays(self) -> list[float]:
        return _parse_delays(self.webhook_retry_seconds)

    @property
    def webhook_allowed_hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.webhook_allow_hosts.split(",") if h.strip()]

    # --- metrics and tracking integrations (tuneforge.metrics, tuneforge.training.integrations) ---
    worker_metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of a training worker's Prometheus /metrics (its pool processes' metrics, "
        "gathered by the main process); unset: no endpoint. One worker per port and host.",
    )
    worker_metrics_host: str = Field("0.0.0.0", description="Interface the worker's /metrics listens on.")
    beat_metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of `tuneforge beat`'s Prometheus /metrics (webhook deliveries, which it "
        "sends), on worker_metrics_host; unset: no endpoint.",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="The MLflow tracking server (or store) jobs' `mlflow` integrations log to; unset: a "
        "job naming mlflow is refused. Users pick the experiment, never the URI.",
    )
    wandb_enabled: bool = Field(
        False,
        description="Workers log jobs' `wandb` integrations to Weights & Biases with their own "
        "WANDB_API_KEY (or WANDB_MODE=offline); off: a job naming wandb is refused.",
    )
    tensorboard_enabled: bool = Field(
        True,
        description="Jobs may ask for the `tensorboard` integration (event files stored as the "
        "artifact `tensorboard`); off: a job naming it is refused.",
    )

    @property
    def work_dir(self) -> Path:
        return (self.work_dir_override or self.data_dir / "work").expanduser().resolve()

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'tuneforge.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{self.data_dir / 'objects'}"
        if self.environment == "production":
            if self.admin_key is None:
                raise ValueError("TUNEFORGE_ADMIN_KEY must be set in production")
            if not self.broker_url:
                raise ValueError("TUNEFORGE_BROKER_URL must be set in production")
        return self

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    @property
    def celery_broker_url(self) -> str:
        """The broker Celery connects to: the configured one, or a SQLite file on this machine."""
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def inference_socket(self) -> Path:
        """The Unix socket of the embedded inference engine (used when inference_engine_url is empty)."""
        return self.data_dir / "inference.sock"

    @property
    def models_dir(self) -> Path:
        return (self.models_dir_override or self.data_dir / "models").expanduser().resolve()


def _parse_delays(value: str) -> list[float]:
    """`"1,2,4"` -> [1.0, 2.0, 4.0]; each a finite number of seconds >= 0 (empty: no retries)."""
    delays: list[float] = []
    for part in filter(str.strip, value.split(",")):
        try:
            delay = float(part)
        except ValueError:
            raise ValueError(f"not a number of seconds: {part.strip()!r}") from None
        if not 0 <= delay < float("inf"):
            raise ValueError(f"a delay must be a finite number of seconds >= 0, not {part.strip()!r}")
        delays.append(delay)
    return delays


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings. Tests that change the environment call `get_settings.cache_clear()`."""
    return Settings()
