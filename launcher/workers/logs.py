"""The workers' log line: a timestamp on every line, since the supervisor keeps their stderr in
one log file per backend and a load, a crash or a slow request is read back by its time."""

from __future__ import annotations

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
