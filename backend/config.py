"""The one settings object. Every knob is an environment variable with the ``DINOLABEL_`` prefix.

Only the entry points (``backend.main.create_app``, ``backend.cli``) read the environment, through
``get_settings()``; everything below them receives plain arguments, so tests can build their own
``Settings`` without touching ``os.environ``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backend.fetch_network import AddressPolicy

Precision = Literal["fp32", "bf16", "fp16"]


class Settings(BaseSettings):
    """Service configuration; see the README's Configuration table for each field."""

    model_config = SettingsConfigDict(env_prefix="DINOLABEL_", extra="ignore")

    # HTTP
    host: str = "0.0.0.0"
    port: int = 9090
    log_level: str = "info"
    max_request_bytes: int = Field(default=100 * 1024 * 1024, gt=0)  # Label Studio's biggest: see README
    basic_auth_user: str | None = Field(
        default=None, validation_alias=AliasChoices("DINOLABEL_BASIC_AUTH_USER", "BASIC_AUTH_USER")
    )
    basic_auth_pass: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DINOLABEL_BASIC_AUTH_PASS", "BASIC_AUTH_PASS")
    )
    api_key: SecretStr | None = None  # /v1 routes: `Authorization: Bearer <key>` (backend/auth.py)

    # Detector
    detector_checkpoint: str = "IDEA-Research/grounding-dino-tiny"
    detector_revision: str | None = None
    device: str = "auto"
    precision: Precision = "fp32"
    box_threshold: float = Field(default=0.35, ge=0.0, le=1.0)
    text_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    nms_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    max_boxes: int = Field(default=100, ge=1)
    batch_size: int | None = Field(default=None, ge=1)  # None: 8 on a GPU, 1 on the CPU (measured: bench/)

    # Queue: Redis + RQ workers
    redis_url: str | None = None
    data_dir: Path = Path.home() / ".dinolabel"
    embedded_worker: bool = True
    interactive_max_tasks: int = Field(default=16, ge=0)
    predict_deadline: float = Field(default=45.0, gt=0)
    bulk_batch_size: int = Field(default=64, ge=1)  # bench/bulk_100k.py: 0.92 of a 100 tasks/s model
    bulk_plan_ahead: int = Field(default=12000, ge=1)  # ~3x bulk_write_size: the model runs while a write is out
    bulk_write_size: int = Field(default=4000, ge=1)  # bench/bulk_100k.py: calls cost Label Studio mostly per call
    bulk_write_wait: float = Field(default=2.0, ge=0)
    batch_timeout: int = Field(default=1800, ge=10)
    webhook_secret: SecretStr | None = None

    # Limits on what one request may ask for; past one, a 422 names the limit and its setting
    max_tasks_per_request: int = Field(default=1_000_000, ge=1)  # Label Studio's own cap on one import
    max_labels: int = Field(default=2000, ge=1)  # labels of one config (LVIS, the largest usual set: 1,203)
    max_phrases: int = Field(default=4000, ge=1)  # phrases to detect per config: labels + predicted_values
    max_prompt_phrases: int = Field(default=100, ge=1)  # phrases typed into a <TextArea> prompt
    max_phrase_length: int = Field(default=200, ge=1)  # characters of a label or phrase (< 256 tokens)

    # Label Studio (fallback: the hostname/access_token that /setup receives)
    label_studio_url: str | None = None
    label_studio_api_key: SecretStr | None = None
    label_studio_retries: int = Field(default=5, ge=0)
    local_files_document_root: Path | None = None
    media_root: Path | None = None

    # Images
    image_timeout: float = Field(default=15.0, gt=0)
    image_total_timeout: float = Field(default=30.0, gt=0)
    fetch_allow: Annotated[tuple[str, ...], NoDecode] = ()
    image_max_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    image_max_pixels: int = Field(default=100_000_000, gt=0)
    image_download_threads: int = Field(default=8, ge=1)
    image_preprocess_threads: int | None = Field(default=None, ge=1)  # None: one per usable core
    # Decode + preprocess in this many processes (0: on threads). None: on a GPU, one per preprocessing
    # thread up to the download threads (the thread feeding the GPU then shares its process with no pixel
    # work); 0 on the CPU.
    image_preprocess_processes: int | None = Field(default=None, ge=0)
    image_thread_niceness: int = Field(default=10, ge=0, le=19)  # image threads yield to the device's feeder
    image_draft_decode: bool = False  # JPEGs >= 2x the model input decoded at 1/2-1/8 scale (faster, not exact)

    # Indexer: the DINOv2 embedder the workers run, and where each project's vectors live
    worker_models: Annotated[tuple[Literal["detector", "embedder"], ...], NoDecode] = ("detector", "embedder")
    embedder_model: str = "vit_small_patch14_dinov2.lvd142m"  # timm name, alias (small/base/large) or folder
    embedder_image_size: int = Field(default=224, ge=14)
    embedder_precision: Precision = "fp32"
    embedder_batch_size: int = Field(default=32, ge=1)
    store_writer: bool = True  # `serve` runs the store writer thread (exactly one per deployment)
    index_new_tasks: bool = False  # TASKS_CREATED also indexes projects never indexed before

    # Priority: the task data fields that carry our ranking in Label Studio (backend/ls_priority.py)
    priority_rank_field: str = Field(default="dinolabel_rank", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    priority_reason_field: str = Field(default="dinolabel_reason", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    # w in score = (1 - w) * distance + w * the detector's uncertainty (0: diversity alone, no predictions read)
    priority_uncertainty_weight: float = Field(default=0.3, ge=0.0, le=1.0, allow_inf_nan=False)
    # Seconds from an annotation event of a prioritized project to its re-ranking; later events join it (0: off)
    priority_rerank_delay: float = Field(default=60.0, ge=0.0, le=86400.0, allow_inf_nan=False)

    # Search and duplicates (the read path of the index)
    search_max_k: int = Field(default=100, ge=1, le=2048)  # most results of one search (faiss GPU caps k at 2048)
    index_cache_projects: int = Field(default=16, ge=1)  # projects whose index the API holds at once (LRU)
    index_cache_bytes: int = Field(default=4 * 1024**3, ge=1)  # vector bytes the API holds at once (LRU)

    @field_validator(
        "basic_auth_user", "basic_auth_pass", "api_key", "detector_revision", "redis_url", "webhook_secret",
        "label_studio_url", "label_studio_api_key", "local_files_document_root", "media_root", mode="before",
    )  # fmt: skip
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``VAR=`` (as compose files and shells often leave it) means unset, not "" or the current folder."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("worker_models", mode="before")
    @classmethod
    def _model_list(cls, value: object) -> object:
        """``DINOLABEL_WORKER_MODELS=detector`` or ``detector,embedder``: which models a worker loads and serves."""
        if isinstance(value, str):
            value = [entry.strip() for entry in value.split(",") if entry.strip()]
        return value

    @field_validator("fetch_allow", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``DINOLABEL_FETCH_ALLOW=minio, 10.0.0.0/8``: split on commas; refused at start-up if an entry is bad."""
        if isinstance(value, str):
            value = [entry.strip() for entry in value.split(",") if entry.strip()]
        if isinstance(value, list | tuple):
            AddressPolicy.parse(str(entry) for entry in value)  # raises ValueError naming the entry
        return value

    @model_validator(mode="after")
    def _key_needs_its_url(self) -> Settings:
        """The operator's key goes only to the operator's Label Studio, so it needs that URL.

        Without one it would have to ride along to whatever ``hostname`` a ``/setup`` call names.
        """
        if self.label_studio_api_key is not None and not self.label_studio_url:
            raise ValueError(
                "DINOLABEL_LABEL_STUDIO_API_KEY is set but DINOLABEL_LABEL_STUDIO_URL is not: the key is only "
                "sent to the Label Studio it belongs to; set that URL too, or unset the key to use the address "
                "and token that Label Studio sends in /setup"
            )
        return self

    @model_validator(mode="after")
    def _priority_fields_differ(self) -> Settings:
        """The rank and its reason are two task data fields: one name for both would overwrite the rank."""
        if self.priority_rank_field == self.priority_reason_field:
            raise ValueError(
                "DINOLABEL_PRIORITY_RANK_FIELD and DINOLABEL_PRIORITY_REASON_FIELD name the same task data field"
            )
        return self

    @property
    def index_dir(self) -> Path:
        """Where the projects' vector stores and faiss indexes live (``indexer.store.project_dir`` below it)."""
        return self.data_dir / "index"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
