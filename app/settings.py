"""The one settings object of diffq, shared by the API, the worker and the CLI.

Every field is read from an environment variable with the ``DIFFQ_`` prefix
(``DIFFQ_REDIS_URL``, ``DIFFQ_MAX_STEPS``, ...). docs/settings.md lists them all;
keep that table in step with this class.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_model_path() -> Path:
    """Where the bundled ``shapes`` model lives, without importing ``diffq.model``.

    ``model/__init__`` may import torch, which the API must never do, so the
    package is located through its import spec instead of being imported.
    """
    spec = importlib.util.find_spec("diffq.model")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve() / "shapes"
    return Path(__file__).resolve().parent.parent / "model" / "shapes"


class Settings(BaseSettings):
    """Deployment settings; see the settings table in docs/settings.md for each one."""

    model_config = SettingsConfigDict(env_prefix="DIFFQ_", extra="ignore")

    # Connections and listening.
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis shared by the API and the workers (redis:// or rediss://).",
    )
    redis_sentinels: str = Field(
        "",
        description="Sentinels as host:port,host:port; set: the primary is found through them (service "
        "redis_sentinel_service) and DIFFQ_REDIS_URL gives only its password, database and TLS (rediss://).",
    )
    redis_sentinel_service: str = Field("diffq", description="The master's name the sentinels monitor.")
    redis_sentinel_password: str | None = Field(None, description="Password of the sentinels themselves.")
    redis_sentinel_tls: bool = Field(False, description="Speak TLS to the sentinels (CA as DIFFQ_REDIS_URL's).")
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="Replicas that must hold a new job (and a job's result) before it is acknowledged "
        "(Redis WAIT); 0: no wait.",
    )
    redis_wait_timeout: float = Field(
        1.0,
        gt=0,
        description="Seconds to wait for redis_wait_replicas; past it POST /v1/jobs answers 503 "
        "(retry with the same Idempotency-Key).",
    )
    redis_allow_eviction: bool = Field(
        False,
        description="Start even if Redis's maxmemory-policy may evict keys (it could drop queued jobs).",
    )
    host: str = Field("127.0.0.1", description="Address the API listens on.")
    public_url: str | None = Field(
        None,
        description="Base of the URLs the API hands out (Location, image URLs), e.g. https://api.example.com; "
        "unset: built from the request's Host.",
    )
    redis_max_connections: int = Field(
        64,
        ge=1,
        description="Connections of each of an API process's two pools for short Redis commands (one for "
        "its threads, one for its event loop); when all are busy: 503 store_busy.",
    )
    redis_wait_connections: int = Field(
        200,
        ge=1,
        description="Connections an API process keeps for blocking reads (long polls, event streams, "
        "OpenAI waits): the most waits it serves at once; over it: 503 too_many_waits.",
    )
    http_keep_alive: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection stays open.")
    http_header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client has to send a request's headers; then the connection is closed."
    )
    http_body_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a client has to send a request's whole body; then 408 and the connection is closed.",
    )
    http_max_connections: int = Field(
        1000, ge=1, description="Connections and requests an API process serves at once; beyond: 503 at once."
    )
    port: int = Field(8000, ge=0, le=65535, description="Port the API listens on.")
    embedded_redis_port: int = Field(
        0, ge=0, le=65535, description="Port of the Redis that `diffq up` embeds; 0 picks a free one."
    )

    # The model a worker serves.
    model_path: Path = Field(default_factory=default_model_path, description="Diffusers folder a worker loads.")
    model_name: str | None = Field(
        None, description="Name the worker serves its model under (default: the model's own)."
    )
    default_model: str | None = Field(
        None, description="Model used when a request names none (default: the only model served, if just one)."
    )
    inpaint_model_path: Path | None = Field(
        None,
        description="Optional 9-channel inpainting checkpoint (same family as the model) that serves inpaint "
        "and outpaint jobs; without it the model inpaints with its own UNet.",
    )
    models: str = Field(
        "",
        description="More models one worker serves beside DIFFQ_MODEL_PATH's: comma-separated name=path, each a "
        "diffusers folder or a single-file .safetensors checkpoint.",
    )
    models_dir: Path | None = Field(
        None,
        description="A folder of models one worker serves: each diffusers subfolder and each .safetensors file "
        "is a model named after it.",
    )
    single_file_config: Path | None = Field(
        None,
        description="Local diffusers folder (configs and tokenizer; weights not needed) whose architecture "
        "single-file checkpoints use when they have no <name>.json naming one.",
    )
    model_memory_bytes: int = Field(
        0,
        ge=0,
        description="Device memory a multi-model worker's loaded pipelines may take; the least recently "
        "used is evicted beyond it (at least one stays). 0: keep every model loaded.",
    )
    model_cpu_memory_bytes: int = Field(
        0,
        ge=0,
        description="CPU RAM for pipelines evicted from the device, so a switch back does not re-read the "
        "disk; 0: off (evicted pipelines are dropped).",
    )
    model_switch_after: int = Field(
        4,
        ge=1,
        description="Multi-model worker: jobs it takes in a row for loaded models while another served "
        "model's queue waits, before it loads that model (the bound on a queue's extra wait).",
    )
    lora_dir: Path | None = Field(
        default_factory=lambda: default_model_path().parent / "loras",
        description="Folder of LoRA adapters (<name>.safetensors) requests may apply; API and workers read it.",
    )
    lora_cache_size: int = Field(8, ge=1, description="LoRA adapters a worker keeps loaded per model.")
    device: str = Field("auto", description="Worker device: auto, cpu, cuda, cuda:1, mps.")
    dtype: str = Field("auto", description="Worker dtype: auto, float32, float16, bfloat16.")
    torch_threads: int = Field(
        0, ge=0, description="CPU threads torch may use in a worker; 0 keeps torch's default (all cores)."
    )

    # The GPU fast path (docs/performance.md, "GPU fast path").
    fast_path: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Worker speed-ups: SDPA attention and channels_last in UNet and VAE, VAE tiling/slicing above "
        "vae_tiling_pixels, torch.compile if `compile`, a warm-up run at start; auto: on CUDA only (the CPU path "
        "stays as it was), on: on any device, off: never.",
    )
    compile: bool = Field(
        False,
        description="With the fast path, torch.compile the UNet (compile_mode) and compile it at worker start with "
        "warm-up runs of the model's default size (minutes) before the worker takes jobs.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "max-autotune-no-cudagraphs",
        description="torch.compile mode of `compile`; the default avoids CUDA graphs, which would record (and keep "
        "memory for) one graph per batch shape.",
    )
    vae_tiling_pixels: int = Field(
        1024 * 1024,
        ge=0,
        description="With the fast path, the VAE decodes in tiles an image of more pixels (width × height) than "
        "this, and one image at a time a call whose images together have more; 0: never.",
    )

    # API keys and what each key may do (a key created with `diffq keys create` may set its own).
    auth: Literal["keys", "off"] = Field(
        "keys",
        description="keys: every /v1 request needs `Authorization: Bearer <key>` (`diffq keys create`) and sees "
        "only its key's jobs; off: no keys, every client sees every job (`diffq up` on a loopback address sets "
        "this unless told otherwise).",
    )
    rate_limit: str = Field(
        "50/second", description='Requests a key may make per period, e.g. "50/second", "1000/minute"; over it: 429.'
    )
    max_queued_jobs: int = Field(1000, ge=1, description="Jobs a key may have queued at once; over it: 429.")
    max_job_cost: int = Field(
        512 * 512 * 50 * 4, ge=1, description="Most width × height × steps × images one job may ask for; over it: 422."
    )
    max_queue_depth: str = Field(
        "",
        description='Most jobs a model may have queued (not yet running), "100" for every model or '
        '"shapes=100,sdxl=20"; over it POST gets 429 with Retry-After; empty: no limit.',
    )
    max_event_streams: int = Field(10, ge=1, description="Event streams (`/events`) a key may hold open at once.")
    poll_interval: float = Field(
        1.0,
        ge=0,
        description="Seconds between answered plain reads (`GET /v1/jobs/{id}` without `?wait=`) of "
        "one job, past a burst of `poll_burst`: a faster read is held until its turn (at most 2 s, else 429 "
        "`polling_too_fast`), so tight polling loops cannot take the host's CPU from its workers; 0: off.",
    )
    poll_burst: int = Field(10, ge=1, description="Reads of one job answered at once before `poll_interval` applies.")
    max_waits: int = Field(
        20,
        ge=1,
        description="Waits a key may hold open at once: long polls (`?wait=`), event streams and "
        "OpenAI-endpoint requests together; over it: 429 too_many_waits.",
    )

    # Request limits (the model adds its own: sizes, schedulers, its max steps).
    max_prompt_length: int = Field(1000, ge=1, description="Longest prompt or negative prompt, in characters.")
    max_steps: int = Field(100, ge=1, description="Most denoising steps a request may ask for.")
    max_images_per_job: int = Field(4, ge=1, description="Most images one job may ask for.")
    max_batch_items: int = Field(10_000, ge=1, description="Most items one batch (`POST /v1/batches`) may hold.")
    max_upload_bytes: int = Field(
        10 * 2**20, ge=1, description="Largest input image (or mask) file, in bytes; larger ones get 413."
    )
    max_upload_pixels: int = Field(
        2048 * 2048,
        ge=1,
        description="Most pixels (width × height) of an input image used as it is, read from its header before "
        "decoding; the model's largest size caps it too (send resize: true for bigger inputs).",
    )
    max_resize_pixels: int = Field(
        4096 * 3072, ge=1, description="Most pixels of an input image sent with resize: true (a 12 MP photo fits)."
    )
    decode_concurrency: int = Field(
        4, ge=1, description="Input images one API process decodes at once; more wait their turn without a thread."
    )
    decode_concurrency_per_key: int = Field(
        2,
        ge=1,
        description="Input images one key may have decoding at once per API process; 8 times as many may "
        "wait, more get 429 too_many_uploads.",
    )
    max_upload_side: int = Field(8192, ge=1, description="Longest width or height of an input image, in pixels.")
    max_request_bytes: int = Field(
        32 * 2**20, ge=1, description="Largest request body, in bytes (JSON with base64 or multipart); else 413."
    )

    # Lifetimes, in seconds.
    job_ttl: int = Field(86400, ge=1, description="How long a job record lives (from creation, renewed when it ends).")
    result_ttl: int = Field(86400, ge=1, description="How long finished PNGs are kept.")
    job_timeout: int = Field(600, ge=1, description="Longest one job may run on a worker before it fails.")

    # Where images, journeys and stored uploads live (docs/storage.md).
    store: Literal["redis", "file", "s3"] = Field(
        "redis",
        description="Result store: redis (beside the job state; small setups), file (a directory: store_dir), s3 "
        "(any S3-compatible store: store_bucket).",
    )
    store_dir: Path | None = Field(None, description="With store=file: the directory (a shared volume or NFS mount).")
    store_bucket: str | None = Field(None, description="With store=s3: the bucket.")
    store_prefix: str = Field("diffq/", description="With store=s3: the key prefix of diffq's objects in the bucket.")
    store_endpoint_url: str | None = Field(
        None, description="With store=s3: the endpoint of a non-AWS store (R2, MinIO, Ceph, GCS); unset: AWS."
    )
    store_region: str | None = Field(None, description="With store=s3: the region (unset: boto3's own lookup).")
    store_addressing: Literal["auto", "path", "virtual"] = Field(
        "auto", description="With store=s3: bucket in the path or the host name (path for most self-hosted stores)."
    )
    store_retry: float = Field(
        30.0,
        ge=0,
        description="Seconds a worker retries a store write (with backoff) before the job fails storage_unavailable.",
    )
    store_sweep_interval: float = Field(
        60.0, gt=0, description="Seconds between sweeps of the file or s3 store for objects no live job references."
    )
    store_sweep_grace: float = Field(
        600.0,
        ge=0,
        description="Least age, in seconds, of an unreferenced object before the sweeper removes it "
        "(uploads of jobs being submitted or finished are not yet referenced).",
    )
    image_urls: Literal["proxy", "signed", "public"] = Field(
        "proxy",
        description="How clients get image bytes: proxy (through the API), signed (presigned URLs straight to "
        "the s3 store), public (under public_base_url, e.g. a CDN in front of the bucket).",
    )
    signed_url_ttl: int = Field(
        3600, ge=1, le=7 * 86400, description="Seconds a signed image URL is valid (minted on each read)."
    )
    public_base_url: str | None = Field(
        None, description="With image_urls=public: base URL the store's objects are served under (key appended)."
    )
    max_retention: int = Field(
        7 * 86400, ge=1, description="Longest retention_seconds a request may ask for (default retention: job_ttl)."
    )

    # Worker liveness and progress reporting.
    heartbeat_interval: float = Field(2.0, gt=0, description="Seconds between worker heartbeats.")
    heartbeat_ttl: int = Field(10, ge=1, description="Seconds after its last heartbeat a worker counts as gone.")

    # Recovery: lost jobs, deadlines, shutdown, Redis outages.
    sweep_interval: float = Field(
        2.0, gt=0, description="Seconds between a worker's sweeps for jobs of lost workers and passed deadlines."
    )
    max_attempts: int = Field(
        3, ge=1, description="Lost attempts (the worker died mid-run) after which a job fails with worker_lost."
    )
    max_deadline: int = Field(86400, ge=1, description="Longest deadline_seconds a request may ask for.")
    shutdown_grace: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds a running job may take to finish before it is handed back."
    )
    redis_retry: float = Field(
        60.0, ge=0, description="Seconds a worker keeps retrying to store a finished job's result while Redis is down."
    )
    progress_interval: float = Field(
        0.5,
        ge=0,
        description="Least seconds between two progress writes of one job, and from its start to the first "
        "(0.5 = at most 2/s; each costs Redis commands, see the README's performance section); the last "
        "step's progress is stored with the job's end.",
    )
    preview_decoder: Literal["latent", "vae", "off"] = Field(
        "latent",
        description="How running jobs' previews are made: latent (a linear projection fitted to the VAE, "
        "cheap), vae (full decode), off.",
    )
    preview_interval: float = Field(
        0.5,
        ge=0,
        description="Least seconds between two previews of one job; a preview is stored with a progress "
        "write, so never more often than progress_interval.",
    )

    # Marking outputs as generated (docs/provenance.md).
    ai_label: bool = Field(
        True,
        description="Write the IPTC digital source type (trainedAlgorithmicMedia; composite… for edits) as XMP into "
        "every output, also when a request sets metadata: false.",
    )
    c2pa_cert: Path | None = Field(
        None, description="PEM certificate chain (signer first) that signs C2PA content credentials; unset: no signing."
    )
    c2pa_key: Path | None = Field(None, description="PEM private key of c2pa_cert.")
    c2pa_alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = Field(
        "es256", description="Signature algorithm of c2pa_key."
    )
    c2pa_timestamp_url: str | None = Field(
        None,
        description="RFC 3161 time-stamp authority for C2PA signatures (unset: none; the signature then "
        "validates only while the certificate does).",
    )
    content_credentials: Literal["required", "optional", "off"] = Field(
        "optional",
        description="C2PA signing for keys that set no policy of their own: required (a job fails rather than go "
        "unsigned; refused at submit without c2pa_cert), optional (signed when c2pa_cert is set), off.",
    )
    watermark_payload: str | None = Field(
        None,
        max_length=32,
        description="Text (≤ 32 bytes) hidden as an invisible watermark in every output of at least 256×256; "
        "unset: no watermark. Needs the worker extra (invisible-watermark).",
    )

    # Cross-request batching in the worker.
    batch_max: int = Field(
        4,
        ge=1,
        description="Most jobs a worker runs as one pipeline call (the one it took plus compatible "
        "queued ones: same size, steps, scheduler, guidance, mode and strength); 1 turns batching off.",
    )
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        description="Longest a worker waits, in milliseconds, for compatible jobs to join a batch "
        "that is not full (no wait when nothing else is queued).",
    )

    # Idempotency-Key and webhooks ("no job lost").
    idempotency_ttl: int = Field(
        86400, ge=1, description="Seconds an Idempotency-Key is remembered; a retry within it gets the same job."
    )
    webhook_secret: str | None = Field(
        None,
        description='Webhook signing secret, "whsec_" + base64 (Standard Webhooks); unset: one is generated '
        "once per deployment and kept in Redis.",
    )
    webhook_allow_loopback: bool = Field(
        False, description="Accept webhook URLs on loopback addresses (127.0.0.0/8, ::1): tests and one-host setups."
    )
    webhook_allow_private: bool = Field(
        False, description="Accept webhook URLs on private addresses (RFC 1918, fc00::/7, 100.64.0.0/10)."
    )
    webhook_timeout: float = Field(10.0, gt=0, description="Seconds each webhook connect, send and read may take.")
    webhook_max_age: int = Field(
        86400, ge=1, description="Seconds a failing webhook delivery is retried, from its first attempt, then given up."
    )
    webhook_lease: int = Field(
        60, ge=1, description="Seconds a webhook deliverer owns a delivery it took; a crashed one's are resent after."
    )

    # Where users already are: the OpenAI-compatible endpoint, job listing, client commands, logs.
    openai_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds POST /v1/images/generations (and edits, variations) waits for its job, "
        "then 504 (the job goes on).",
    )
    sdapi_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds POST /sdapi/v1/txt2img and img2img wait for their job, then 504 (the job goes on).",
    )
    job_listing: bool = Field(
        False,
        description="Serve GET /v1/jobs (recent jobs, ids included) to any client; off where job ids are the only "
        "access control.",
    )
    url: str | None = Field(
        None,
        description="API base URL for the client commands (diffq generate, jobs, cancel); default http://host:port.",
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log lines: json (one object a line, with job_id), text, or auto (json unless a terminal)."
    )

    log_level: str = Field("info", description="Log level of the API and worker processes.")

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: str) -> str:
        from diffq.app.contract.connection import parse_sentinels

        parse_sentinels(value)
        return value

    @field_validator("max_queue_depth")
    @classmethod
    def _depths(cls, value: str) -> str:
        from diffq.app.core.backpressure import parse_depths

        parse_depths(value)
        return value

    @field_validator("rate_limit")
    @classmethod
    def _a_rate(cls, value: str) -> str:
        from diffq.app.auth.quotas import parse_rate  # ValueError: pydantic reports it against the field

        parse_rate(value)
        return value


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    """Settings read once from the environment; processes share this instance."""
    return Settings()
