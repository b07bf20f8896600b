"""The CPU image, compose and `--runtime docker` against a real docker engine.

Marked `docker` (deselected by default): `.ci/run` runs `pytest -m docker` when an engine
answers. The image is built from a Debian bookworm base made with debootstrap (no image
registry is needed; LLMUP_TEST_BASE_IMAGE names another), with the llama-cpp-python wheel
pip already built for this machine offered to the build, so it is not compiled again.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import docker
import httpx
import openai
import pytest
import yaml
from conftest import run_cli
from support.backend_fixtures import TEMPLATE
from support.ggufgen import write_llama_gguf

from launcher.backends.supervise.container import BACKEND_LABEL, OWNER_LABEL
from launcher.netaddr import free_port
from launcher.runkey import KEY_ENV

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("LLMUP_TEST_BASE_IMAGE", "llmup-base:bookworm")
IMAGE = "llmup-test:cpu"
KEY = "docker-test-key"
# what .dockerignore lets into the build context
CONTEXT_FILES = [
    "pyproject.toml",
    "requirements.txt",
    "README.md",
    ".dockerignore",
    "launcher",
    "profiles",
    "docker",
]


def sh(*args: str, log: Path | None = None, timeout: float = 600, **kw) -> str:
    """Run a command and return its stdout (compose warns on stderr, e.g. about the cluster
    profile's secret file, which must not be parsed as output); on failure the assertion
    shows both."""
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    out = result.stdout + result.stderr
    if log is not None:
        log.write_text(out)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{out[-6000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def engine():
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"-m docker needs a docker engine that answers: {exc}")
    return client


@pytest.fixture(scope="module")
def base_image(engine) -> str:
    try:
        engine.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        sh(str(ROOT / "docker" / "debootstrap-base.sh"), BASE_IMAGE, timeout=1200)
    return BASE_IMAGE


def llama_wheels() -> list[Path]:
    """The llama-cpp-python wheel pip built for the installed version, if it kept one."""
    version = importlib.metadata.version("llama-cpp-python")
    cache = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True
    ).stdout.strip()
    pattern = f"{cache}/wheels/**/llama_cpp_python-{version}-*.whl"
    return [Path(p) for p in glob.glob(pattern, recursive=True)][:1]


def ca_bundle() -> Path | None:
    for name in (os.environ.get("PIP_CERT"), ssl.get_default_verify_paths().cafile):
        if name and Path(name).is_file():
            return Path(name)
    return None


def build_context(folder: Path) -> Path:
    """The repository's files an image needs, plus this machine's wheel and CA bundle."""
    for name in CONTEXT_FILES:
        src = ROOT / name
        if src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.whl", "*.crt")
            shutil.copytree(src, folder / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(src, folder / name)
    for wheel in llama_wheels():
        shutil.copy2(wheel, folder / "docker" / "wheels" / wheel.name)
    if (bundle := ca_bundle()) is not None:
        shutil.copy2(bundle, folder / "docker" / "ca-certificates" / "build-host.crt")
    return folder


@pytest.fixture(scope="module")
def cpu_image(engine, base_image, tmp_path_factory) -> str:
    context = build_context(tmp_path_factory.mktemp("context"))
    log = tmp_path_factory.mktemp("logs") / "build.log"
    started = time.monotonic()
    sh(
        "docker", "build", "-f", "docker/Dockerfile.cpu", "--build-arg", f"BASE_IMAGE={base_image}",
        "-t", IMAGE, ".", cwd=context, log=log, timeout=2400,
    )  # fmt: skip
    size = engine.images.get(IMAGE).attrs["Size"]
    print(f"\nbuilt {IMAGE} in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")
    return IMAGE


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    return write_llama_gguf(folder / "tiny.gguf", tensor_type="F32", chat_template=TEMPLATE)


def test_image_runs_as_a_non_root_user_without_compilers(engine, cpu_image):
    container = engine.containers.run(
        cpu_image,
        entrypoint=["sh", "-c", "id -u; command -v gcc cc cmake || echo no-compiler; llmup --help"],
        detach=True,
    )
    try:
        assert container.wait(timeout=60)["StatusCode"] == 0
        out = container.logs().decode()
    finally:
        container.remove(v=True)  # with the anonymous volumes of the image's VOLUME lines
    uid, *rest = out.splitlines()
    assert uid == "1000"
    assert "no-compiler" in rest and "profiles" in out  # llmup profiles is a command


def wait_healthy(url: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # with the key: without one /health tells only the status
            reply = httpx.get(
                url + "/health", timeout=3, headers={"Authorization": f"Bearer {KEY}"}
            )
            if reply.status_code == 200:
                return reply.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not healthy in {timeout} s")


def chat_turn(url: str, session: str, text: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": text}],
        max_tokens=8,
        extra_headers={"X-Session-Id": session},
    )
    assert reply.choices[0].message.content, reply
    return reply.choices[0].message.content


def session_messages(url: str, session: str) -> list[dict]:
    reply = httpx.get(
        f"{url}/v1/sessions/{session}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["messages"]


class Compose:
    """`docker compose` (v2) or `docker-compose` (v1) on the repository's compose.yaml, with
    an override that mounts the tiny model and plans it instead of a hub download."""

    def __init__(self, tmp: Path, model: Path, keys: str, project: str) -> None:
        self.tmp, self.project = tmp, project
        self.port = free_port()
        override = {
            "services": {
                "cpu-16g": {
                    "volumes": [f"{model}:/models/{model.name}:ro"],
                    "environment": {
                        "LLMUP_PLANNING__MODEL_FILE": f"/models/{model.name}",
                        "LLMUP_PLANNING__CONTEXT": "1024",
                        # give up at the first crash: the restart policy brings it back
                        "LLMUP_SERVE__MAX_RESTARTS": "0",
                    },
                }
            }
        }
        (tmp / "override.yaml").write_text(yaml.safe_dump(override))
        (tmp / "keys").write_text(keys)
        self.env = {
            **os.environ,
            "LLMUP_API_KEYS_FILE": str(tmp / "keys"),
            "LLMUP_PORT": str(self.port),
            "LLMUP_CPU_IMAGE": IMAGE,
        }
        self.url = f"http://127.0.0.1:{self.port}"

    @staticmethod
    def command() -> list[str]:
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if v2.returncode == 0:
            return ["docker", "compose"]
        assert shutil.which("docker-compose"), "neither `docker compose` nor docker-compose"
        return ["docker-compose"]

    def __call__(self, *args: str) -> str:
        files = ["-f", str(ROOT / "compose.yaml"), "-f", str(self.tmp / "override.yaml")]
        base = [*self.command(), "-p", self.project, *files, "--profile", "cpu-16g"]
        return sh(*base, *args, env=self.env, cwd=ROOT)

    def container(self, engine):
        (cid,) = self("ps", "-q").split()
        return engine.containers.get(cid)


def wait_container_health(container, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        status = container.attrs["State"].get("Health", {}).get("Status")
        if status == "healthy":
            return status
        time.sleep(2)
    raise AssertionError(f"{container.name} health is {status}")


def test_compose_profile_serves_and_keeps_sessions_across_down_and_up(
    engine, cpu_image, tiny_model, tmp_path
):
    compose = Compose(tmp_path, tiny_model, KEY + "\n", f"llmuptest{os.getpid()}")
    try:
        compose("up", "-d")
        health = wait_healthy(compose.url)
        assert health["model"] == "tiny" and health["context"] == 1024
        container = compose.container(engine)
        assert wait_container_health(container) == "healthy"  # the image's HEALTHCHECK
        bindings = container.attrs["HostConfig"]["PortBindings"]["8000/tcp"]
        assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(compose.port)}]
        chat_turn(compose.url, "compose-1", "Hello")
        chat_turn(compose.url, "compose-1", "And again")
        assert len(session_messages(compose.url, "compose-1")) == 4
        assert_home_private(container)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=compose.url + "/v1", api_key="wrong").models.list()
        compose("down")
        assert not compose("ps", "-q").split()
        compose("up", "-d")
        wait_healthy(compose.url)
        assert len(session_messages(compose.url, "compose-1")) == 4  # the volume kept it
        chat_turn(compose.url, "compose-1", "Third")
        assert len(session_messages(compose.url, "compose-1")) == 6
        logs = compose("logs")  # the ready line: keys from the secret, never printed
        assert "'$LLMUP_API_KEY'" in logs and "keys file: /run/secrets/llmup_api_keys" in logs
        assert KEY not in logs and "api_key='none'" not in logs
        assert_restarted_after_giving_up(engine, compose.container(engine))
        wait_healthy(compose.url)
        assert len(session_messages(compose.url, "compose-1")) == 6
        assert "llmup stopped restarting it" in compose("logs")
    finally:
        compose("down", "-v")


def assert_home_private(container) -> None:
    """The llmup home volume and all in it: the image user's only (0700 folders, 0600 files)."""
    code, out = container.exec_run(["stat", "-c", "%a %U", "/data/llmup"])
    assert code == 0 and out.decode().split() == ["700", "llmup"], out
    code, out = container.exec_run(["find", "/data/llmup", "-perm", "/077"])
    assert code == 0 and out.decode().strip() == "", out  # nothing readable by others


KILL_WORKER = """
import os, signal
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if int(pid) != os.getpid() and b"-m\\0launcher.workers.llamacpp" in cmd:
        os.kill(int(pid), signal.SIGKILL)
        print(pid)
"""


def assert_restarted_after_giving_up(engine, container) -> None:
    """Kill the backend in the container: serve (MAX_RESTARTS 0) gives up and exits 1, and
    `restart: unless-stopped` starts the container again."""
    since = int(time.time()) - 1
    code, killed = container.exec_run(["python", "-c", KILL_WORKER])
    assert code == 0 and killed.split(), killed
    deadline = time.monotonic() + 120
    while container.attrs["RestartCount"] < 1:
        assert time.monotonic() < deadline, container.logs()[-4000:]
        time.sleep(1)
        container.reload()
    events = engine.events(
        since=since, until=int(time.time()) + 1, decode=True,
        filters={"container": container.id, "event": "die"},
    )  # fmt: skip
    assert [e["Actor"]["Attributes"]["exitCode"] for e in events][:1] == ["1"]


def test_compose_without_a_key_refuses_to_start(engine, cpu_image, tiny_model, tmp_path):
    compose = Compose(tmp_path, tiny_model, "", f"llmupnokey{os.getpid()}")
    try:
        compose("up", "-d")
        deadline = time.monotonic() + 60
        # the secret is empty and no LLMUP_API_KEY is set: the keys file holds no key
        while "holds no key" not in (logs := compose("logs")):
            assert time.monotonic() < deadline, logs
            time.sleep(1)
        with pytest.raises(httpx.HTTPError):
            httpx.get(compose.url + "/health", timeout=2)
    finally:
        compose("down", "-v")


class DockerServe:
    """`llmup serve --runtime docker` in a subprocess, its output in a file."""

    def __init__(self, model: Path, home: Path, port: int, image: str = IMAGE) -> None:
        self.url = f"http://127.0.0.1:{port}"
        home.mkdir(parents=True, exist_ok=True)
        self.out = home / f"serve-{time.monotonic_ns()}.out"
        env = {**os.environ, "LLMUP_HOME": str(home), "LLMUP_DOCKER__CPU_IMAGE": image}
        args = ["--model-file", str(model), "--context", "1024", "--api-key", KEY]
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "launcher", "serve", "--runtime", "docker", *args,
                 "--port", str(port), "--quiet"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def ready(self) -> dict:
        try:
            return wait_healthy(self.url)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.out.read_text()[-4000:]}") from None

    def containers(self, engine) -> list:
        owner = f"{OWNER_LABEL}={os.uname().nodename}:{self.proc.pid}"
        return engine.containers.list(filters={"label": [BACKEND_LABEL, owner]})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def test_runtime_docker_serves_supervises_and_keeps_sessions(
    engine, cpu_image, tiny_model, tmp_path
):
    home, port = tmp_path / "home", free_port()
    served = DockerServe(tiny_model, home, port)
    try:
        served.ready()
        (backend,) = served.containers(engine)
        ports = backend.attrs["HostConfig"]["PortBindings"]
        assert [b["HostIp"] for bs in ports.values() for b in bs] == ["127.0.0.1"]
        binds = [m for m in backend.attrs["Mounts"] if m["Type"] == "bind"]
        # the weights read-only; the slot worker's saved sessions read-write, in the home
        assert sorted((m["Destination"], m["RW"]) for m in binds) == sorted(
            [(str(tiny_model), False), (str(home / "slots"), True)]
        )
        volumes = [m["Name"] for m in backend.attrs["Mounts"] if m["Type"] == "volume"]
        assert not backend.attrs["HostConfig"].get("DeviceRequests")
        key = dict(e.split("=", 1) for e in backend.attrs["Config"]["Env"])[KEY_ENV]
        (direct,) = [f"http://127.0.0.1:{b['HostPort']}" for bs in ports.values() for b in bs]
        assert key != KEY and httpx.get(direct + "/v1/models", timeout=5).status_code == 401
        bearer = {"Authorization": f"Bearer {key}"}  # the run's key, which the proxy sends
        assert httpx.get(direct + "/v1/models", headers=bearer, timeout=5).status_code == 200
        chat_turn(served.url, "runtime-1", "Hello")
        chat_turn(served.url, "runtime-1", "Again")
        log = next((home / "logs").glob("llamacpp-*.log")).read_text()
        assert "POST /v1/chat/completions" in log  # the container's output, followed
        backend.kill()  # a crash: the supervisor starts a new container
        deadline = time.monotonic() + 120
        while (health := wait_healthy(served.url))["backend"]["restarts"] < 1:
            assert time.monotonic() < deadline, health
            time.sleep(1)
        assert [c.id for c in served.containers(engine)] != [backend.id]
        chat_turn(served.url, "runtime-1", "After the crash")
        served.stop()
        assert not served.containers(engine)  # stopped with llmup serve
        left = {v.name for v in engine.volumes.list()}
        assert not left & set(volumes)  # the image's anonymous volumes went with it
    finally:
        served.stop()
    again = DockerServe(tiny_model, home, port)
    try:
        again.ready()
        assert len(session_messages(again.url, "runtime-1")) == 6
        (orphan,) = again.containers(engine)
        again.proc.kill()  # SIGKILL: llmup cannot stop its container
        again.proc.wait(timeout=30)
    finally:
        again.stop()
    third = DockerServe(tiny_model, home, free_port())
    try:
        third.ready()  # its first container start removed the orphan
        assert orphan.id not in [c.id for c in engine.containers.list(all=True)]
    finally:
        third.stop()
    assert not third.containers(engine)


def test_runtime_docker_without_the_image_is_one_line(engine, tiny_model):
    result = run_cli(
        "serve", "--runtime", "docker", "--model-file", str(tiny_model), "--quiet",
        env={"LLMUP_DOCKER__CPU_IMAGE": "llmup-test:absent"},
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "image llmup-test:absent is not on this docker engine" in lines[0]
