"""Replicas behind HAProxy with their sessions in PostgreSQL: what the hop and the database
cost per turn, what a second replica adds on one machine, and how long a replica's death
interrupts its sessions.

Run: python benchmarks/scale_out.py [--quick] [--out benchmarks/results/scale_out.json]

Starts, on this machine and on loopback only: a PostgreSQL 15 of its own (Debian's package,
default durability: fsync on), `llmup serve --model-file M` replicas and HAProxy on the
shipped docker/haproxy.cfg (tests/support/cluster.py starts the last two servers). Session turns
(a new user message with X-Session-Id, the reply capped at max_tokens with the end tokens
banned, so every turn does the same work) from concurrent clients, each session four turns,
every arm on fresh sessions; the arms alternate in blocks so that the machine's load falls
on all of them:

- direct, SQLite: one replica with the default store, called directly;
- direct, PostgreSQL: one replica with its sessions in PostgreSQL, called directly;
- HAProxy, 1 replica: the same replica through HAProxy (the second server down);
- HAProxy, 2 replicas: both replicas up (measured after the blocks above).

Per arm: turns/s and the latency of a turn, p50 and p99. The overheads are differences of
the arms: PostgreSQL vs SQLite, and the HAProxy hop vs direct. On a machine shared with
other work these differences drown in scheduling noise, so the store's own share of a turn
(load the session, commit the turn) is also timed in-process, SQLite against PostgreSQL,
and the hop alone on GET /health (no model, no store), directly and through HAProxy.

Failover: with two replicas serving sessions, the replica holding some is killed (SIGKILL
of its process group, as a lost machine) and a client sends the next turn of one of its
sessions at once, retrying on errors; the time from the kill to that answered turn (its
history read from PostgreSQL, its KV cache rebuilt on the other replica), then the replica
is restarted; several runs.

M: a tiny generated Llama, whose turn takes a few ms, so that the hop's and the store's
costs stand out (a real model's turn adds its decode time to every arm alike; with three
servers of Gemma 3 270M on these 2 shared cores a turn took seconds, which measured the
machine's load rather than llmup). The machine has 2 cores: two replicas share them, so
the second adds no decode capacity here; on two machines it would. --quick runs fewer
sessions and one failover.

Targets: the HAProxy hop adds below 5 ms per request at p50 (on /health), PostgreSQL's
store work below 10 ms per turn at p50 over SQLite's, and a dead replica's session answered
again within 10 s (HAProxy's active checks alone would take 2 x 2 s; its passive check
reacts sooner).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from benchlib import (
    LOOPBACK,
    ROOT,
    Run,
    answers,
    bench_model,
    bounded_load,
    free_port,
    llmup_command,
    no_end_bias,
    parser,
    percentile,
    print_table,
    spawn,
    stop,
    target,
    wait_until,
)

sys.path.insert(0, str(ROOT / "tests"))
from support.cluster import HAProxy, PostgresServer  # noqa: E402

from launcher.proxy.store import NewTurn, SqliteStore  # noqa: E402
from launcher.proxy.store.postgres import PostgresStore  # noqa: E402

MAX_TOKENS = 8
TURNS = 4
ARMS = ("direct, SQLite", "direct, PostgreSQL", "HAProxy, 1 replica")
TWO = "HAProxy, 2 replicas"
DEADLINE_S = 600


@dataclass
class Sizes:
    clients: int
    sessions_per_client: int  # per arm and block
    blocks: int
    failovers: int
    store_turns: int  # turns of the store-only measurement, per store


FULL, QUICK = Sizes(4, 4, 3, 3, 400), Sizes(2, 1, 1, 1, 40)
_sessions = itertools.count()


@dataclass
class Replica:
    name: str
    port: int
    home: Path
    extra: list[str]
    proc: Any = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, model: Path) -> Replica:
        self.home.mkdir(parents=True, exist_ok=True)
        command = llmup_command(model, self.port, "--replica-name", self.name, *self.extra)
        self.proc = spawn(command, self.home / "serve.log", {"LLMUP_HOME": str(self.home)})
        wait_until(lambda: answers(self.url), self.proc, timeout=300)
        return self

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class Chat:
    """What every turn sends: the served model's id and the bias that bans its end tokens."""

    model: str
    bias: dict[str, float]

    def turn(self, client: httpx.Client, url: str, session: str, number: int) -> httpx.Response:
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": f"Turn {number}: one more word?"}],
                "logit_bias": self.bias}  # fmt: skip
        headers = {"X-Session-Id": session}
        return client.post(url + "/v1/chat/completions", json=body, headers=headers)


def workload(chat: Chat, url: str, sizes: Sizes) -> dict[str, Any]:
    """Every client runs its sessions' turns in order: each turn's latency, the wall time."""
    prefix = f"bench-{next(_sessions)}"
    clients = [httpx.Client(timeout=120, trust_env=False) for _ in range(sizes.clients)]

    def one(client: int, i: int) -> list[float]:
        latencies = []
        for number in range(1, TURNS + 1):
            started = time.perf_counter()
            chat.turn(clients[client], url, f"{prefix}-{client}-{i}", number).raise_for_status()
            latencies.append(time.perf_counter() - started)
        return latencies

    started = time.perf_counter()
    done = bounded_load(
        one, requests=sizes.clients * sizes.sessions_per_client, concurrency=sizes.clients,
        deadline_s=DEADLINE_S,
    )  # fmt: skip
    wall = time.perf_counter() - started
    for c in clients:
        c.close()
    return {"latencies": [x for session in done for x in session], "wall_s": wall}


def quantiles(seconds: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(1000 * percentile(seconds, 50), 3),
        "p99_ms": round(1000 * percentile(seconds, 99), 3),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x for r in runs for x in r["latencies"]]
    wall = sum(r["wall_s"] for r in runs)
    return {
        "turns": len(latencies),
        "turns_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(1000 * percentile(latencies, 50), 2),
        "p99_ms": round(1000 * percentile(latencies, 99), 2),
    }


def store_costs(url: str, folder: Path, turns: int) -> dict[str, dict[str, float]]:
    """The store's own share of a turn (load the session, commit the turn), in this process:
    SQLite against PostgreSQL, without HTTP or decoding around it."""
    stores = {"sqlite": SqliteStore(folder / "costs.sqlite3"), "postgresql": PostgresStore(url)}
    message = [{"role": "user", "content": "one more?"}, {"role": "assistant", "content": "yes"}]
    costs = {}
    for name, store in stores.items():
        times = []
        for i in range(turns):
            session = f"cost-{i // TURNS}"
            started = time.perf_counter()
            base = store.load("bench", session)
            store.commit(
                "bench", session, NewTurn(base=base, keep=len(base.turns), messages=message)
            )
            times.append(time.perf_counter() - started)
        store.close()
        costs[name] = quantiles(times)
    return costs


def hop_costs(direct: str, proxy: str, requests: int) -> dict[str, dict[str, float]]:
    """The hop's own cost: GET /health (no model, no store) directly and through HAProxy,
    alternating, one at a time."""
    times: dict[str, list[float]] = {"direct": [], "haproxy": []}
    with httpx.Client(timeout=30, trust_env=False) as client:
        for _ in range(requests):
            for name, url in (("direct", direct), ("haproxy", proxy)):
                started = time.perf_counter()
                client.get(url + "/health").raise_for_status()
                times[name].append(time.perf_counter() - started)
    return {name: quantiles(t) for name, t in times.items()}


def failover(chat: Chat, proxy: HAProxy, replicas: dict[str, Replica], model: Path) -> float:
    """Kill the replica holding a session; seconds until that session's next turn answers."""
    client = httpx.Client(timeout=120, trust_env=False)
    prefix = f"failover-{next(_sessions)}"
    owners = {}
    for i in range(8):
        reply = chat.turn(client, proxy.url, f"{prefix}-{i}", 1)
        reply.raise_for_status()
        owners[f"{prefix}-{i}"] = reply.headers["x-llmup-replica"]
    session, victim = next(iter(owners.items()))
    replicas[victim].kill()
    killed = time.monotonic()
    while time.monotonic() - killed < 120:
        try:
            reply = chat.turn(client, proxy.url, session, 2)
            if reply.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    else:
        raise SystemExit(f"{session} was not answered within 120 s of {victim}'s death")
    elapsed = time.monotonic() - killed
    assert reply.headers["x-llmup-replica"] != victim
    replicas[victim].start(model)
    proxy.wait_status(victim, "UP")
    client.close()
    return elapsed


def measure(model: Path, name: str, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Every arm and the failover runs on one model."""
    with ExitStack() as stack:
        postgres = PostgresServer(free_port()).start()
        stack.callback(postgres.remove)
        url = postgres.create_database("llmup")
        sqlite = Replica("solo", free_port(), folder / "solo", [])
        replicas = {n: Replica(n, free_port(), folder / n, ["--sessions-db", url])
                    for n in ("r1", "r2")}  # fmt: skip
        for replica in (sqlite, replicas["r1"]):
            stack.callback(lambda r=replica: r.proc and stop(r.proc))
            replica.start(model)
        stack.callback(lambda: replicas["r2"].proc and stop(replicas["r2"].proc))
        proxy = HAProxy(
            bind=free_port(), stats=free_port(), log=folder / "haproxy.log",
            replicas={n: f"{LOOPBACK}:{r.port}" for n, r in replicas.items()},
        ).start()  # fmt: skip
        stack.callback(proxy.stop)
        proxy.wait_status("r2", "DOWN")
        chat = Chat(
            httpx.get(sqlite.url + "/v1/models").json()["data"][0]["id"], no_end_bias(model)
        )
        urls = dict(zip(ARMS, (sqlite.url, replicas["r1"].url, proxy.url)))
        runs: dict[str, list] = {arm: [] for arm in (*ARMS, TWO)}
        for _ in range(sizes.blocks):
            for arm in ARMS:
                runs[arm].append(workload(chat, urls[arm], sizes))
        replicas["r2"].start(model)
        proxy.wait_status("r2", "UP")
        for _ in range(sizes.blocks):
            runs[TWO].append(workload(chat, proxy.url, sizes))
        deaths = [failover(chat, proxy, replicas, model) for _ in range(sizes.failovers)]
        costs = store_costs(url, folder, sizes.store_turns)
        hop = hop_costs(replicas["r1"].url, proxy.url, sizes.store_turns)
    rows = [{"model": name, "arm": arm, **summary(r)} for arm, r in runs.items()]
    return {"model": name, "rows": rows, "failover_s": [round(d, 3) for d in deaths],
            "store_only": costs, "hop_only": hop}  # fmt: skip


def overheads(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    by_arm = {r["arm"]: r for r in result["rows"]}

    def diff(a: str, b: str) -> dict[str, float]:
        return {q: round(by_arm[a][q] - by_arm[b][q], 2) for q in ("p50_ms", "p99_ms")}

    store = result["store_only"]
    return {
        "postgres_vs_sqlite": diff("direct, PostgreSQL", "direct, SQLite"),
        "postgres_vs_sqlite_store_only": {
            q: round(store["postgresql"][q] - store["sqlite"][q], 3) for q in ("p50_ms", "p99_ms")
        },
        "haproxy_hop": diff("HAProxy, 1 replica", "direct, PostgreSQL"),
        "haproxy_hop_health_only": {
            q: round(result["hop_only"]["haproxy"][q] - result["hop_only"]["direct"][q], 3)
            for q in ("p50_ms", "p99_ms")
        },
    }


def render(results: list[dict[str, Any]]) -> None:
    rows = [
        (r["model"], r["arm"], r["turns"], r["turns_per_s"], r["p50_ms"], r["p99_ms"])
        for result in results
        for r in result["rows"]
    ]
    columns = ("model", "arm", "turns", "turns/s", "p50 ms", "p99 ms")
    print_table("Session turns through HAProxy and PostgreSQL", columns, rows)
    added = [
        (res["model"], what, o["p50_ms"], o["p99_ms"])
        for res in results
        for what, o in res["overhead"].items()
    ]
    print_table("Added per turn", ("model", "cost", "p50 ms", "p99 ms"), added)
    store = [(res["model"], kind, c["p50_ms"], c["p99_ms"])
             for res in results for kind, c in res["store_only"].items()]  # fmt: skip
    print_table("The store's work per turn", ("model", "store", "p50 ms", "p99 ms"), store)
    deaths = [(res["model"], ", ".join(f"{d:.2f}" for d in res["failover_s"])) for res in results]
    print_table(
        "Replica killed: seconds to its session's next answered turn", ("model", "runs"), deaths
    )


def targets_of(results: list[dict[str, Any]]) -> list[dict]:
    tiny = results[-1]
    return [
        target("HAProxy hop, p50 added per request (GET /health)",
               tiny["overhead"]["haproxy_hop_health_only"]["p50_ms"], 5, "below", "ms"),
        target("PostgreSQL vs SQLite, p50 added per turn (the store's own work)",
               tiny["overhead"]["postgres_vs_sqlite_store_only"]["p50_ms"], 10, "below", "ms"),
        target("replica killed to its session's next answered turn (worst run)",
               max(d for r in results for d in r["failover_s"]), 10, "at most", "s"),
    ]  # fmt: skip


def main() -> None:
    args = parser(__doc__, "scale_out").parse_args()
    run = Run("scale_out", args.quick)
    sizes = QUICK if args.quick else FULL
    models = [bench_model(True)]
    results = []
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmup-scale-")))
        for path, name in models:
            result = measure(path, name, sizes, folder / name.replace(" ", "-"))
            result["overhead"] = overheads(result)
            results.append(result)
    render(results)
    conditions = {"clients": sizes.clients, "sessions_per_arm": sizes.clients
                  * sizes.sessions_per_client * sizes.blocks, "turns_per_session": TURNS,
                  "max_tokens": MAX_TOKENS, "postgresql": _version(["psql", "--version"]),
                  "haproxy": _version(["haproxy", "-v"])}  # fmt: skip
    run.write(args.out, {"conditions": conditions, "models": results}, targets_of(results))


def _version(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0].strip() if done.stdout else "unknown"


if __name__ == "__main__":
    main()
