"""A head start for `llmup serve`: the backend spawned from a record of the last launch of the
same command, before the launcher has imported, detected and planned, so that its ~0.6 s of
work on 2 cores overlaps the backend's load instead of preceding it.

- `begin(argv)` runs first in the `llmup` process (`launcher.__main__`), with the standard
  library and the spawning parts of this package only. When the home's record says what the
  last `llmup serve` with this command line, llmup environment, folder and Python started,
  and its model file is the same file (size, mtime), it spawns that worker on a new free port
  with a new per-run key, its output in the usual log after a banner marked "head start".
- The pipeline then plans as always and builds its spec; `take(spec)` hands the child to the
  supervisor when the spec is the same launch (port and key aside), and otherwise stops it,
  so the supervisor spawns what the plan says. A head start decides nothing: a changed
  machine, file or setting costs only the load it did for nothing.
- Only a local backend without GPUs is recorded (`remember`): the detection that runs while
  the child loads must not count its memory as taken, and on the CPU the child's own
  resident memory is added back to the RAM available (`pid`, `hardware.system.held_by`),
  which GPU memory could not be as simply.
- Whatever is not taken is stopped when the command ends (`discard`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.logfile import prepare_log, spawn_logged
from launcher.backends.supervise.process import Child, LocalRuntime, SpawnError
from launcher.jsonfile import read_json, write_json_atomic
from launcher.netaddr import free_port
from launcher.private import default_home
from launcher.runkey import new_backend_key

log = logging.getLogger(__name__)

RECORD = "launches.json"  # under the llmup home
RECORD_FORMAT = 1
KEPT = 8  # commands remembered, the most recently started ones
STOP_GRACE_S = 2.0
# What may change a plan besides the command line: llmup's settings and the GPUs it may see
ENV_PREFIXES = ("LLMUP_", "HF_", "CUDA_", "HUGGINGFACE_")
NOTE = " (head start)"


@dataclass(frozen=True)
class Adoption:
    """A head-started child the supervisor takes over: its spec, the child, and where its
    output starts in the log."""

    spec: BackendSpec
    child: Child
    log_offset: int


@dataclass
class HeadStart:
    """This command's head start: which invocation it is, and the child when one was spawned."""

    invocation: str  # a hash of the command line, llmup environment, folder and Python
    home: Path
    adoption: Adoption | None = None

    @property
    def pid(self) -> int | None:
        """The head-started child's pid while nobody took it: the RAM it holds is the plan's
        own, so the machine's detection adds it back (`hardware.system.held_by`)."""
        return None if self.adoption is None else self.adoption.child.pid

    def take(self, spec: BackendSpec) -> Adoption | None:
        """The head-started child when it runs `spec`'s launch (port and key aside), else
        None, the child stopped."""
        adoption, self.adoption = self.adoption, None
        if adoption is None:
            return None
        same = spec.with_run(port=adoption.spec.port, api_key=adoption.spec.api_key)
        if same == adoption.spec and adoption.child.poll() is None:
            return adoption
        log.info("the head start ran another launch than the plan's; stopping it")
        adoption.child.stop(STOP_GRACE_S)
        return None

    def discard(self) -> None:
        """Stop a child nobody took (the command failed, or never got to the backend)."""
        adoption, self.adoption = self.adoption, None
        if adoption is not None:
            adoption.child.stop(STOP_GRACE_S)

    def remember(self, spec: BackendSpec, model: Path, home: Path) -> None:
        """Record `spec` as what the next start of this command spawns first (a local launch
        without GPUs into this command's home only); never fails the serve."""
        if spec.devices or Path(home).expanduser() != self.home:
            return
        try:
            launch = {"model": model_identity(model), "spec": spec_record(spec)}
            write_json_atomic(
                self.home / RECORD, with_launch(read_records(self.home), self.invocation, launch)
            )
        except OSError as exc:
            log.warning("could not record the launch for a head start: %s", exc)


def invocation(argv: list[str], environ: Mapping[str, str], cwd: str) -> str:
    """What makes two `llmup` commands the same one, as a hash."""
    env = {k: v for k, v in environ.items() if k.upper().startswith(ENV_PREFIXES)}
    facts = {"argv": argv, "env": env, "cwd": cwd, "python": sys.executable, "llmup": __version__}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def wants_head_start(argv: list[str]) -> bool:
    """`llmup serve ...`, not asking for help."""
    return bool(argv) and argv[0] == "serve" and not {"--help", "-h"} & set(argv)


def begin(argv: list[str], environ: Mapping[str, str] | None = None) -> HeadStart:
    """This command's head start: the last launch of the same command spawned again, when
    the home's record has one; never raises (a head start is only ever an optimisation)."""
    environ = os.environ if environ is None else environ
    home = Path(environ.get("LLMUP_HOME") or default_home()).expanduser()
    head = HeadStart(invocation(argv, environ, os.getcwd()), home)
    if not wants_head_start(argv):
        return head
    try:
        spec = recorded_spec(read_records(home).get(head.invocation))
        if spec is not None:
            head.adoption = spawn(spec)
    except (OSError, SpawnError, ValueError, KeyError, TypeError) as exc:
        log.debug("no head start: %s", exc)
    return head


def read_records(home: Path) -> dict[str, Any]:
    """The home's launches by invocation ({} when none or unreadable)."""
    record = read_json(home / RECORD)
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return {}
    launches = record.get("launches")
    return launches if isinstance(launches, dict) else {}


def with_launch(launches: dict[str, Any], invocation: str, launch: dict[str, Any]) -> dict:
    """The record with `launch` as the invocation's, stamped now; the least recently started
    beyond KEPT dropped."""
    newest_yet = max((_stamp(v) for v in launches.values()), default=0.0)
    at = max(time.time(), newest_yet + 1e-3)  # after every other, whatever the clock did
    launches = launches | {invocation: launch | {"at": at}}
    newest = sorted(launches, key=lambda k: _stamp(launches[k]))[-KEPT:]
    return {"format": RECORD_FORMAT, "launches": {k: launches[k] for k in newest}}


def _stamp(launch: Any) -> float:
    at = launch.get("at") if isinstance(launch, dict) else None
    return at if isinstance(at, (int, float)) else 0.0


def recorded_spec(record: Any) -> BackendSpec | None:
    """The recorded launch on a new port with a new key, when its model file is unchanged."""
    if not isinstance(record, dict):
        return None
    model = record["model"]
    if model_identity(Path(model["path"])) != model:
        return None
    spec = spec_from_record(record["spec"])
    return spec.with_run(port=free_port(), api_key=new_backend_key())


def spawn(spec: BackendSpec) -> Adoption:
    prepare_log(spec.log_path)
    child, offset = spawn_logged(LocalRuntime(), spec, 1, note=NOTE)
    return Adoption(spec, child, offset)


def model_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def spec_record(spec: BackendSpec) -> dict[str, Any]:
    """The spec as JSON, without its key (a record never holds one)."""
    record = asdict(spec)
    record.pop("api_key")
    record["log_path"] = str(spec.log_path)
    record["env_unset"] = sorted(spec.env_unset)
    record["state_dirs"] = [str(p) for p in spec.state_dirs]
    record["devices"] = list(spec.devices)
    return record


def spec_from_record(record: dict[str, Any]) -> BackendSpec:
    return BackendSpec(
        **{
            **record,
            "log_path": Path(record["log_path"]),
            "env_unset": frozenset(record["env_unset"]),
            "state_dirs": tuple(Path(p) for p in record["state_dirs"]),
            "devices": tuple(record["devices"]),
        }
    )
