"""One settings tree: defaults < profile file < environment (LLMUP_, nested with "__") < CLI.

The CLI builds a Settings from the environment, then overrides the fields a flag was
given for; core code receives values, never reads the environment itself.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from launcher.errors import UsageError
from launcher.private import default_home


class PlanningSettings(BaseModel):
    """What the planner is asked for. `model` pins one model (an id or a size: "13b");
    `max_model` caps the size instead (the largest model up to it that fits wins)."""

    model: str | None = None
    max_model: str | None = None
    model_file: Path | None = None
    backend: Literal["auto", "llama.cpp", "exllamav2"] = "auto"
    context: int = Field(default=4096, gt=0)
    kv_cache: Literal["f16", "q8_0", "q4_0"] = "f16"
    # llama.cpp's flash attention; auto: on without GPUs (a quantized V cache turns it on)
    flash_attn: Literal["auto", "on", "off"] = "auto"
    reserve_mib: int = Field(default=1024, ge=0)
    ram_reserve_mib: int = Field(default=1024, ge=0)
    allow_offload: bool = False
    gpus: str | None = None  # like --gpus / CUDA_VISIBLE_DEVICES: "0,2"
    min_tokens_per_s: float | None = Field(default=None, ge=0)
    # below this expected decode speed the plan says it will be slow, and what is faster
    readable_tokens_per_s: float = Field(default=5.0, gt=0)
    parallel: int | None = Field(default=None, ge=1)  # llama.cpp sequences; None: as fit
    llamacpp_impl: Literal["slots", "server"] = "slots"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.I)
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> Any:
    """Seconds from "604800", "7d", "12h", "30m" or a number; anything else is left for
    pydantic to reject with its own message."""
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match.group(1)) * _UNIT_S[match.group(2).lower()]
    return value


# An idle session's lifetime, however it is spelled (LLMUP_SESSION_TTL or
# LLMUP_PROXY__SESSION_TTL): seconds or "30m"/"12h"/"7d", at least 0; 0 keeps sessions forever.
SessionTtl = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# A replica's name: what it says in X-Llmup-Replica, HAProxy's name for its server and the
# tag in the ids it hands out, so letters, digits, "." and "-" (a host name's characters).
REPLICA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")


def default_replica_name() -> str:
    """The host name (a container's is its id), or "llmup" when it is not a usable name."""
    name = socket.gethostname()
    return name if REPLICA_NAME.match(name) else "llmup"


def check_replica_name(value: str) -> str:
    if not REPLICA_NAME.match(value):
        raise ValueError(
            "a replica name is 1-63 letters, digits, '.' or '-', starting with a letter or "
            "digit (it is HAProxy's name for the server and goes into ids)"
        )
    return value


def check_sessions_db(value: str | None) -> str | None:
    """A postgresql:// URL or the path of an SQLite file; any other URL is refused."""
    if value is not None and "://" in value and not value.startswith(POSTGRES_SCHEMES):
        raise ValueError(
            "sessions_db must be a postgresql:// URL or the path of an SQLite file, not "
            f"{value.split('://', 1)[0]}://..."
        )
    return value or None


def split_keys(value: Any) -> Any:
    """API keys from a comma-separated string (the form an environment variable takes)."""
    if isinstance(value, str):
        return [key.strip() for key in value.split(",") if key.strip()]
    return value


# A value that names a file rather than being a key: absolute, home- or dot-relative.
_PATH_LIKE = re.compile(r"^(?:/|~|\.{1,2}[/\\]|[A-Za-z]:[/\\])")


def literal_keys(value: Any) -> Any:
    """Keys from a list setting (LLMUP_API_KEYS, LLMUP_PROXY__API_KEYS): literal keys only.

    A value that looks like a path is refused rather than taken as a key: an older llmup read
    a file named there, and a key that is really a missing file's name would let anyone who
    guesses the path in (it fails open). Keys files have their own setting."""
    keys = split_keys(value)
    for key in keys if isinstance(keys, list) else []:
        if isinstance(key, str) and _PATH_LIKE.match(key):
            raise UsageError(
                f"LLMUP_API_KEYS (and LLMUP_PROXY__API_KEYS) hold keys, not files, and {key!r} "
                "looks like a path: name a "
                "keys file with LLMUP_API_KEYS_FILE (or --api-key-file); a key that really "
                "starts like a path goes in LLMUP_API_KEY"
            )
    return keys


def split_hosts(value: Any) -> Any:
    """Host names from a comma-separated string, lower-cased (DNS names are caseless)."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list):
        return [str(name).strip().lower() for name in value if str(name).strip()]
    return value


ANY_MODEL = "*"  # as a model alias: answer to any model name (llama-cpp-python's server does)


def split_names(value: Any) -> Any:
    """Model names from a comma-separated string (the form an environment variable takes),
    kept as written (model names are case-sensitive, as OpenAI's are)."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list):
        return list(dict.fromkeys(str(name).strip() for name in value if str(name).strip()))
    return value


def split_origins(value: Any) -> Any:
    """Web origins (`https://app.example.com`, `http://localhost:3000`, or `*`) from a
    comma-separated string; anything else is refused, naming it."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return value
    origins = [str(origin).strip().rstrip("/").lower() for origin in value if str(origin).strip()]
    for origin in origins:
        parts = urlsplit(origin)
        plain = parts.scheme in ("http", "https") and parts.netloc and not parts.path
        if origin != "*" and not (plain and not parts.query and not parts.fragment):
            raise ValueError(
                f"{origin!r} is not a web origin: give scheme://host[:port] "
                "(e.g. https://app.example.com) or *"
            )
    return origins


class ProxySettings(BaseModel):
    """The public surface: bind address, keys, sessions and the limits in front of the backend.

    Whether a prompt fits is the backend's count of it (the rendered chat template,
    tokenized). `message_overhead_tokens` is only the first guess of what a template adds
    around each message (role markers, BOS/EOS) when the proxy picks which old turns of a
    session to try leaving out; the backend's count then decides. `default_reserve_tokens`
    is the room a session's older turns are left out for when a request sets no `max_tokens`
    (at most a quarter of the context); such a reply may still run to the end of the context.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    insecure_no_auth: bool = False
    # Without keys, the Host names (besides loopback and IP addresses) a request may carry
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # More names the served model answers to (an app's fixed default model name); "*": any
    model_aliases: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Web pages of these origins may call the API from a browser (CORS); none by default
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    context_policy: Literal["drop", "error"] = "drop"
    session_ttl: SessionTtl = Field(default=7 * 86400.0, description="seconds; 0: never expire")
    # where sessions live: None is sessions.sqlite3 under the llmup home; a path is another
    # SQLite file; a postgresql:// URL a database shared by replicas (its password may come
    # from `sessions_db_password_file`, a docker secret, rather than the URL)
    sessions_db: str | None = None
    sessions_db_password_file: Path | None = None
    sessions_db_pool_size: int = Field(default=8, ge=1)
    sessions_db_timeout_s: float = Field(default=5.0, gt=0)
    replica_name: str = Field(default_factory=default_replica_name)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_inflight: int = Field(default=4, ge=1)
    queue_size: int = Field(default=64, ge=0)
    retry_after_s: int = Field(default=2, ge=1)
    backend_timeout_s: float = Field(default=600.0, gt=0)
    # a reply's token limit when a request sets none, and the most one may ask for
    # (llama-server's -n); None: the rest of the context
    max_tokens: int | None = Field(default=None, ge=1)
    message_overhead_tokens: int = Field(default=8, ge=0)
    default_reserve_tokens: int = Field(default=256, ge=1)

    max_request_messages: int = Field(default=1000, ge=1)
    max_session_messages: int = Field(default=2000, ge=2)
    # per API key (without keys, every caller is the one anonymous owner): requests queued
    # or running at once, live sessions, and bytes of stored conversations
    max_requests_per_key: int = Field(default=32, ge=1)
    max_sessions_per_key: int = Field(default=10_000, ge=1)
    max_stored_bytes_per_key: int = Field(default=1024**3, ge=1)

    _split_keys = field_validator("api_keys", mode="before")(literal_keys)
    _split_hosts = field_validator("allowed_hosts", mode="before")(split_hosts)
    _split_names = field_validator("model_aliases", mode="before")(split_names)
    _split_origins = field_validator("cors_origins", mode="before")(split_origins)
    _replica = field_validator("replica_name")(check_replica_name)
    _sessions_db = field_validator("sessions_db")(check_sessions_db)


class ServeSettings(BaseModel):
    """`llmup serve`'s process life: the backend's health checks and restart budget, how a
    stop proceeds, and the read timeouts of the public listener.

    A backend failing `health_failures` checks in a row (one every `health_interval_s`, each
    given `health_timeout_s`) is restarted; more than `max_restarts` restarts within
    `restart_window_s` and serve exits non-zero. On SIGTERM the backend gets `stop_grace_s`
    before SIGKILL and requests in flight `shutdown_timeout_s` in all. A client must send its
    request headers within `header_timeout_s` and its body within `body_timeout_s`.
    """

    health_interval_s: float = Field(default=5.0, gt=0)
    health_timeout_s: float = Field(default=5.0, gt=0)
    health_failures: int = Field(default=3, ge=1)
    max_restarts: int = Field(default=5, ge=0)
    restart_window_s: float = Field(default=600.0, gt=0, description="seconds")
    stop_grace_s: float = Field(default=3.0, ge=0)
    shutdown_timeout_s: float = Field(default=5.0, gt=0)
    header_timeout_s: float = Field(default=20.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)

    _window = field_validator("restart_window_s", mode="before")(parse_duration)


class DockerSettings(BaseModel):
    """The images `llmup serve --runtime docker` runs a backend in, per accelerator."""

    cpu_image: str = "llmup:cpu"
    cuda_image: str = "llmup:cuda"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMUP_", env_nested_delimiter="__", extra="ignore", populate_by_name=True
    )

    home: Path = Field(default_factory=default_home)
    planning: PlanningSettings = Field(default_factory=PlanningSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    docker: DockerSettings = Field(default_factory=DockerSettings)
    runtime: Literal["local", "docker"] = "local"

    # The short environment names, folded into `proxy` (they win over its defaults,
    # not over LLMUP_PROXY__* values set explicitly). LLMUP_API_KEYS is keys only; a keys
    # file is LLMUP_API_KEYS_FILE.
    api_key: str | None = Field(default=None, validation_alias=AliasChoices("LLMUP_API_KEY"))
    api_keys: str | None = Field(default=None, validation_alias=AliasChoices("LLMUP_API_KEYS"))
    api_keys_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("LLMUP_API_KEYS_FILE")
    )
    context_policy: Literal["drop", "error"] | None = Field(
        default=None, validation_alias=AliasChoices("LLMUP_CONTEXT_POLICY")
    )
    session_ttl: Annotated[SessionTtl | None, NoDecode] = Field(
        default=None, validation_alias=AliasChoices("LLMUP_SESSION_TTL")
    )

    @model_validator(mode="after")
    def _fold_short_names(self) -> Settings:
        proxy, given = self.proxy, self.proxy.model_fields_set
        keys = list(proxy.api_keys)
        if self.api_key:
            keys.append(self.api_key)
        if self.api_keys:
            keys += literal_keys(self.api_keys)
        if self.api_keys_file is not None and "api_keys_file" not in given:
            proxy.api_keys_file = self.api_keys_file
        proxy.api_keys = list(dict.fromkeys(keys))
        if self.context_policy and "context_policy" not in given:
            proxy.context_policy = self.context_policy
        if self.session_ttl is not None and "session_ttl" not in given:
            proxy.session_ttl = self.session_ttl
        return self

    def with_proxy(self, **changes: Any) -> Settings:
        """A copy with these proxy settings changed; this tree stays as it was (the CLI's
        flags and serve's own adjustments build new settings, never assign into a shared
        one)."""
        return self.model_copy(update={"proxy": self.proxy.model_copy(update=changes)})


class ProfileSource(PydanticBaseSettingsSource):
    """A machine profile's pinned settings: one layer above the defaults, below the
    environment (and so below the CLI flags, which the CLI lays over the result)."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.values


MODEL_CHOICE = frozenset({"model", "max_model"})  # a model pin or a size cap: one choice


def without_model_choice(planning: dict[str, Any]) -> dict[str, Any]:
    """A layer's planning values less its model choice, when a higher layer makes one: the
    environment's LLMUP_PLANNING__MAX_MODEL=7b over a profile's `model = "70b"` caps at 7B
    rather than being lifted by a pin the user did not give."""
    return {name: value for name, value in planning.items() if name not in MODEL_CHOICE}


def load_settings(profile_values: dict[str, Any] | None = None) -> Settings:
    """The settings tree: defaults < profile (`profile_values`) < environment."""
    if not profile_values:
        return Settings()
    values = profile_values
    if MODEL_CHOICE & Settings().planning.model_fields_set:
        values = values | {"planning": without_model_choice(values.get("planning", {}))}

    class ProfiledSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            profile = ProfileSource(settings_cls, values)
            return init_settings, env_settings, dotenv_settings, file_secret_settings, profile

    return ProfiledSettings()
