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

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).parent / "data" / "compose-spec" / "compose-spec.json"
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


def test_every_machine_profile_has_its_compose_profile():
    assert set(services_by_profile()) == set(PROFILES)
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


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
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
