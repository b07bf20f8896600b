"""The docker runtime: a BackendSpec run in a container through the docker SDK.

`llmup serve --runtime docker` runs the planned backend in the image for the plan's
accelerator (settings `docker.cpu_image` / `docker.cuda_image`): the spec's command with the
image's python, listening inside the container and published on the host's 127.0.0.1 only,
the weights mounted read-only at the very paths the command names, exactly the planned GPUs
requested from the engine, and the container's output followed into the backend's log. The
supervisor waits for it, restarts it and stops it like a local process; a container whose
llmup died without stopping it is removed by the next llmup that starts one.

The SDK is the `docker` extra (`pip install 'llmup[docker]'`), imported only here.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.process import SpawnError
from launcher.errors import DockerRuntimeError
from launcher.planning.plan import Plan
from launcher.private import open_private, private_dir
from launcher.settings import DockerSettings

try:  # the `docker` extra; without it, connect() says how to install it
    import docker
    import requests
except ImportError:  # pragma: no cover - exercised where the extra is absent
    docker = requests = None

log = logging.getLogger(__name__)

BACKEND_LABEL = "io.llmup.backend"
OWNER_LABEL = "io.llmup.owner"  # "<hostname>:<pid>" of the llmup that started it
DOCKERFILES = {"cpu": "docker/Dockerfile.cpu", "cuda": "docker/Dockerfile.cuda"}
GONE = 255  # the exit code given to a container removed behind llmup's back


def connect() -> Any:
    """A client of the engine DOCKER_HOST names (or the local socket), answering now."""
    if docker is None:
        raise DockerRuntimeError(
            "the docker runtime needs the docker SDK: pip install 'llmup[docker]'"
        )
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerRuntimeError(
            f"cannot reach a docker engine at {where} ({_short(exc)}): start it, or serve "
            "without --runtime docker"
        ) from None
    return client


def _short(exc: BaseException) -> str:
    """The innermost reason of an SDK error, on one line."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def accelerator(plan: Plan) -> str:
    """cuda or cpu: which image the plan needs. Apple's GPU is out of a container's reach."""
    devices = [d.device for d in plan.placement.devices]
    if any(d.startswith("metal") for d in devices):
        raise DockerRuntimeError(
            "the plan puts the model on Apple's GPU (Metal), which containers cannot use: "
            "serve without --runtime docker"
        )
    cuda = plan.backend == "exllamav2" or any(d.startswith("cuda") for d in devices)
    return "cuda" if cuda else "cpu"


def image_for(plan: Plan, cfg: DockerSettings) -> str:
    return cfg.cuda_image if accelerator(plan) == "cuda" else cfg.cpu_image


def check_image(client: Any, image: str, kind: str) -> None:
    """The image must already be on the engine (llmup never pulls or builds it)."""
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise DockerRuntimeError(
            f"image {image} is not on this docker engine: build it in llmup's repository with "
            f"`docker build -f {DOCKERFILES[kind]} -t {image} .`, or name another with "
            f"LLMUP_DOCKER__{kind.upper()}_IMAGE"
        ) from None


def check_engine(plan: Plan, cfg: DockerSettings) -> Any:
    """Fail before anything is downloaded: the engine answers and has the plan's image."""
    client = connect()
    check_image(client, image_for(plan, cfg), accelerator(plan))
    return client


def container_command(spec: BackendSpec) -> list[str]:
    """The spec's `python -m module ...` as the image runs it: the image's python, bound to
    every interface of the container (the host publishes the port on 127.0.0.1 only)."""
    interpreter, *args = spec.command
    if args[:1] != ["-m"] or "--host" not in args:
        raise DockerRuntimeError(
            f"the {spec.name} backend's command is not `python -m MODULE ... --host HOST`; "
            "the docker runtime cannot run it"
        )
    args[args.index("--host") + 1] = "0.0.0.0"
    return ["python", *args]


def gpu_requests(devices: Iterable[str]) -> list[dict[str, Any]]:
    """One engine device request for exactly the plan's NVIDIA GPUs (none for a CPU plan)."""
    ids = [d.split(":", 1)[1] for d in devices if d.startswith("cuda:")]
    if not ids:
        return []
    return [{"Driver": "nvidia", "DeviceIDs": ids, "Capabilities": [["gpu"]]}]


def container_env(spec: BackendSpec) -> dict[str, str]:
    """The spec's launch environment, the per-run backend key included (the worker refuses
    every request without it, and the proxy sends it); the requested GPUs are the
    container's only ones (numbered from 0 inside), so a host CUDA_VISIBLE_DEVICES would
    point at the wrong ones."""
    env = spec.launch_env()
    if gpu_requests(spec.devices):
        env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def weight_mounts(paths: Iterable[Path]) -> dict[str, str]:
    """{path in the container: host source} for the weights, read-only at their own paths.

    A file in the Hugging Face cache is a link into its repository's blobs, so the whole
    `models--ORG--NAME` folder is mounted (it holds that one model); any other file or folder
    is mounted alone, resolved through links.
    """
    mounts: dict[str, str] = {}
    for path in paths:
        path = Path(path).absolute()
        repo = next((p for p in path.parents if p.name.startswith("models--")), None)
        target = repo if repo is not None else path
        mounts[str(target)] = str(target.resolve())
    return mounts


def container_name(spec: BackendSpec) -> str:
    return f"llmup-{re.sub(r'[^A-Za-z0-9_.-]+', '-', spec.name)}-{spec.port}"


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def container_options(
    spec: BackendSpec, *, image: str, weights: Iterable[Path], user: str | None = None
) -> dict[str, Any]:
    """The arguments of `containers.run` for a spec: a plain value the tests can read."""
    return {
        "image": image,
        "command": container_command(spec),
        "entrypoint": [],
        "environment": container_env(spec),
        "ports": {f"{spec.port}/tcp": ("127.0.0.1", spec.port)},
        "mounts": [
            {"Target": target, "Source": source, "Type": "bind", "ReadOnly": True}
            for target, source in weight_mounts(weights).items()
        ]
        + [
            {"Target": str(d), "Source": str(d), "Type": "bind", "ReadOnly": False}
            for d in spec.state_dirs
        ],
        "device_requests": gpu_requests(spec.devices),
        "labels": {BACKEND_LABEL: spec.name, OWNER_LABEL: owner()},
        "name": container_name(spec),
        "user": user if user is not None else f"{os.getuid()}:{os.getgid()}",
        "healthcheck": {"test": ["NONE"]},  # the image's checks llmup serve, not a backend
        "init": True,
        "detach": True,
    }


def remove_orphans(client: Any) -> None:
    """Remove backend containers whose llmup (on this host) is gone: killed with SIGKILL,
    it could not stop them."""
    here = socket.gethostname()
    for container in client.containers.list(all=True, filters={"label": BACKEND_LABEL}):
        host, _, pid = container.labels.get(OWNER_LABEL, "").rpartition(":")
        if host != here or not pid.isdigit() or _alive(int(pid)):
            continue
        log.warning("removing %s, left running by llmup pid %s", container.name, pid)
        try:
            container.remove(force=True, v=True)
        except docker.errors.DockerException as exc:
            log.warning("could not remove %s: %s", container.name, _short(exc))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DockerRuntime:
    """Spawns a spec as a container of `image` with `weights` mounted read-only (and the
    spec's state folders read-write)."""

    def __init__(self, client: Any, *, image: str, weights: Iterable[Path]) -> None:
        self.client, self.image, self.weights = client, image, list(weights)

    def spawn(self, spec: BackendSpec, log_file: BinaryIO) -> ContainerChild:
        remove_orphans(self.client)
        for folder in spec.state_dirs:  # a bind mount needs its source
            private_dir(folder)
        options = container_options(spec, image=self.image, weights=self.weights)
        try:
            container = self.client.containers.run(**options)
        except docker.errors.DockerException as exc:
            raise SpawnError(
                f"cannot start a container from {self.image}: {_short(exc)}", kind="unknown"
            ) from None
        log.info("started container %s from %s", container.name, self.image)
        return ContainerChild(container, spec.log_path)


class ContainerChild:
    """A running backend container, its output appended to the log by a follower thread."""

    def __init__(self, container: Any, log_path: Path) -> None:
        self.container = container
        self._code: int | None = None
        self._reaped = False
        self._pid = container.attrs.get("State", {}).get("Pid") or None
        self._logs = threading.Thread(
            target=self._follow, args=(log_path,), name=f"logs-{container.name}", daemon=True
        )
        self._logs.start()

    @property
    def pid(self) -> int | None:
        """The host pid of the container's init process."""
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._code

    def _follow(self, log_path: Path) -> None:
        with open_private(log_path, "ab") as out:
            try:
                for chunk in self.container.logs(stream=True, follow=True):
                    out.write(chunk)
                    out.flush()
            except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
                log.debug("stopped following %s: %s", self.container.name, exc)

    def poll(self) -> int | None:
        if self._code is not None:
            return self._code
        try:
            self.container.reload()
        except docker.errors.NotFound:
            self._code = GONE
            return self._code
        state = self.container.attrs["State"]
        if state["Status"] in ("exited", "dead"):
            self._code = _exit_code(state)
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        if self._code is not None:
            return self._code
        try:
            self.container.wait(timeout=timeout)
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            if timeout is not None:
                raise subprocess.TimeoutExpired(self.container.name, timeout) from None
        except docker.errors.NotFound:
            self._code = GONE
            return self._code
        code = self.poll()
        return code if code is not None else GONE

    def stop(self, grace_s: float) -> int | None:
        if self.poll() is None:
            try:
                self.container.stop(timeout=max(1, round(grace_s)))
            except docker.errors.NotFound:
                self._code = GONE
            self.wait()
        self.reap()
        return self._code

    def reap(self) -> None:
        """Let the log follower drain, then remove the container (it exited) and the
        anonymous volumes the image's VOLUME lines gave it (a backend keeps nothing there)."""
        if self._reaped:
            return
        self._logs.join(timeout=10)
        try:
            self.container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            log.warning("could not remove %s: %s", self.container.name, _short(exc))
        self._reaped = True


def _exit_code(state: dict[str, Any]) -> int:
    """The container's exit code; the OOM killer's as a SIGKILL's (137)."""
    return 137 if state.get("OOMKilled") else int(state.get("ExitCode", GONE))
