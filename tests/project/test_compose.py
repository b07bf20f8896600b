"""compose.yaml and the Dockerfiles, read as files: the Compose Specification's own schema
accepts compose.yaml, every machine profile has its compose profile with the right image
and GPUs, and the images keep the promises the README makes (what runs them is in
test_docker.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from launcher.profiles import all_profiles
from launcher.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).parents[1] / "data" / "compose-spec" / "compose-spec.json"
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
PROFILES = {p.name: p for p in all_profiles(Settings().home)}


def dockerfile(kind: str) -> str:
    return (ROOT / "docker" / f"Dockerfile.{kind}").read_text()


def test_compose_file_follows_the_compose_specification():
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(COMPOSE), key=lambda e: list(e.path)
    )
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_schema_rejects_what_compose_rejects():
    """The validator is really applied: a misspelt key fails it."""
    broken = {"services": {"x": {"image": "a", "restrat": "always"}}}
    assert list(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(broken))


def services_by_profile() -> dict[str, tuple[str, dict]]:
    found = {}
    for name, service in COMPOSE["services"].items():
        for profile in service.get("profiles", []):
            found[profile] = (name, service)
    return found


CLUSTER = {name: svc for name, svc in COMPOSE["services"].items() if "cluster" in svc["profiles"]}
MACHINES = {name: svc for name, svc in COMPOSE["services"].items() if name not in CLUSTER}


def test_every_machine_profile_has_its_compose_profile():
    assert set(services_by_profile()) == set(PROFILES) | {"cluster"}
    assert len(PROFILES) >= 9


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_compose_service_runs_its_profile_on_the_right_image(name):
    _, service = services_by_profile()[name]
    profile = PROFILES[name]
    assert service["command"] == ["--profile", name]
    kind = profile.accelerator
    assert service["build"]["dockerfile"] == f"docker/Dockerfile.{kind}"
    assert re.fullmatch(rf"\$\{{LLMUP_{kind.upper()}_IMAGE:-llmup:{kind}\}}", service["image"])
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    devices = devices.get("devices", [])
    if kind == "cuda":
        assert devices == [
            {"driver": "nvidia", "count": len(profile.hardware.gpus), "capabilities": ["gpu"]}
        ]
    else:
        assert devices == []


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_service_keeps_data_restarts_and_stays_on_loopback(name):
    service = COMPOSE["services"][name]
    assert service["restart"] == "unless-stopped"
    assert all(p.startswith("127.0.0.1:") for p in service["ports"]), service["ports"]
    assert all(p.endswith(":8000") for p in service["ports"])
    env = image_env("cuda" if "Dockerfile.cuda" in service["build"]["dockerfile"] else "cpu")
    volumes = dict(v.split(":", 1) for v in service["volumes"])
    assert volumes == {"hf-cache": env["HF_HOME"], "llmup-home": env["LLMUP_HOME"]}
    assert set(volumes) <= set(COMPOSE["volumes"])
    assert "--insecure-no-auth" not in service["command"]
    assert service["secrets"] == ["llmup_api_keys"]
    assert service["environment"]["LLMUP_PROXY__API_KEYS_FILE"] == "/run/secrets/llmup_api_keys"
    assert service["environment"]["LLMUP_API_KEY"] == "${LLMUP_API_KEY:-}"


def image_env(kind: str) -> dict[str, str]:
    """The ENV block of a Dockerfile's final stage."""
    final = dockerfile(kind).rsplit("\nFROM ", 1)[1].replace("\\\n", " ")
    lines = [ln[4:] for ln in final.splitlines() if ln.startswith("ENV ")]
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(lines)))


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_dockerfile_promises(kind):
    text = dockerfile(kind)
    assert text.count("\nFROM ") >= 2 and "AS builder" in text  # multi-stage
    final = text.rsplit("\nFROM ", 1)[1]
    assert "build-essential" not in final and "cmake" not in final  # no compilers
    assert re.search(r"^USER llmup$", final, re.M) and "useradd" in final
    assert 'VOLUME ["/data/huggingface", "/data/llmup"]' in final
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/health", final, re.M)
    assert 'ENTRYPOINT ["llmup", "serve"]' in final
    assert image_env(kind)["LLMUP_PROXY__HOST"] == "0.0.0.0"
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)


def test_default_base_images_are_the_public_ones():
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in dockerfile("cpu")
    cuda = dockerfile("cuda")
    assert "ARG BUILD_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04" in cuda
    assert "ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04" in cuda
    assert "-DGGML_CUDA=on" in cuda and '"/src[exllamav2]"' in cuda


def test_cluster_profile_is_postgres_replicas_and_haproxy_on_one_published_port():
    replicas = {name: svc for name, svc in CLUSTER.items() if name.startswith("llmup-")}
    assert set(CLUSTER) == {"postgres", "haproxy", *replicas} and len(replicas) >= 2
    postgres = CLUSTER["postgres"]
    assert postgres["image"] == "${LLMUP_POSTGRES_IMAGE:-postgres:15-bookworm}"  # official
    assert postgres["volumes"] == ["pg-data:/var/lib/postgresql/data"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/llmup_db_password"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    # only HAProxy is published, on loopback, with the shipped config
    published = {name: svc["ports"] for name, svc in CLUSTER.items() if svc.get("ports")}
    assert published == {"haproxy": ["127.0.0.1:${LLMUP_PORT:-8000}:8000"]}
    assert (
        "./docker/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"
        in CLUSTER["haproxy"]["volumes"]
    )
    assert set(COMPOSE["secrets"]) == {"llmup_api_keys", "llmup_db_password"}


def test_each_replica_is_a_named_haproxy_server_with_its_own_home():
    haproxy = (ROOT / "docker" / "haproxy.cfg").read_text()
    homes = set()
    for name, service in CLUSTER.items():
        if not name.startswith("llmup-"):
            continue
        command = service["command"]
        replica = command[command.index("--replica-name") + 1]
        env = service["environment"]
        assert env["LLMUP_PROXY__SESSIONS_DB"] == "postgresql://llmup@postgres:5432/llmup"
        assert env["LLMUP_PROXY__SESSIONS_DB_PASSWORD_FILE"] == "/run/secrets/llmup_db_password"
        assert set(service["secrets"]) == {"llmup_api_keys", "llmup_db_password"}
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "--insecure-no-auth" not in command
        volumes = dict(v.split(":", 1) for v in service["volumes"])
        assert volumes["hf-cache"] == "/data/huggingface"
        homes.add(next(v for v, path in volumes.items() if path == "/data/llmup"))
        # HAProxy's server of that name points at this service, in every backend
        line = f'server {replica} "${{LLMUP_{replica.upper()}-{name}:8000}}"'
        assert haproxy.count(line) == 3, line
    assert len(homes) == len([n for n in CLUSTER if n.startswith("llmup-")])  # one each
