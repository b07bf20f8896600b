"""Two `llmup serve` replicas sharing their sessions in a real PostgreSQL, behind a real HAProxy
on the shipped docker/haproxy.cfg: each session stays on one replica; a replica killed with
SIGKILL loses nothing acknowledged, its sessions continue on the other with their whole
history, a turn in flight is stored whole or not at all and a retry with the same
Idempotency-Key makes one turn; the killed replica, restarted, rejoins and takes sessions."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support.backend_fixtures import NO_EOS, TEMPLATE
from support.cluster import FAST, HAPROXY_CFG, HAProxy, PostgresServer
from support.ggufgen import write_llama_gguf
from support.serving import FAST_HEALTH, Served

from launcher.netaddr import free_port
from launcher.proxy.replica import routed_id

pytestmark = pytest.mark.timeout(600)

KEY = "scale-out-test-key"
MODEL = "tiny-chat"
SESSIONS = [f"team-{i}" for i in range(8)]
NEW_SESSIONS = [f"late-{i}" for i in range(8)]


@dataclass
class Cluster:
    postgres: PostgresServer
    haproxy: HAProxy
    replicas: dict[str, Served]
    args: dict[str, list[str]]
    homes: dict[str, Path]
    ports: dict[str, int]
    env: dict[str, str]

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEY}"}
        return httpx.Client(base_url=self.haproxy.url, headers=headers, timeout=120)

    def start(self, name: str) -> None:
        """Start (or restart) a replica. A restarted one takes its predecessor's place among
        the servers the module started, so conftest's per-test cleanup leaves it running."""
        old = self.replicas.get(name)
        new = Served(self.args[name], self.homes[name], self.ports[name], self.env)
        if old in Served.started:
            Served.started.remove(new)
            Served.started[Served.started.index(old)] = new
        self.replicas[name] = new
        new.wait_ready()
        self.haproxy.wait_status(name, "UP")

    def kill(self, name: str) -> None:
        """SIGKILL the replica's whole process group (llmup and its backend), as a lost box."""
        proc = self.replicas[name].proc
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    model = write_llama_gguf(folder / "tiny-chat.gguf", tensor_type="F32", chat_template=TEMPLATE)
    postgres = PostgresServer(free_port(), settings=FAST).start()
    url = postgres.create_database("llmup")
    names = ("r1", "r2")
    ports = {name: free_port() for name in names}
    homes = {name: folder / name for name in names}
    for home in homes.values():
        home.mkdir()
    args = {
        name: ["--model-file", str(model), "--context", "1024", "--sessions-db", url,
               "--replica-name", name]
        for name in names
    }  # fmt: skip
    env = {**FAST_HEALTH, "LLMUP_API_KEY": KEY}
    haproxy = HAProxy(
        bind=free_port(), stats=free_port(), log=folder / "haproxy.log",
        replicas={name: f"127.0.0.1:{port}" for name, port in ports.items()},
    )  # fmt: skip
    running = Cluster(postgres, haproxy, {}, args, homes, ports, env)
    try:
        haproxy.start()
        for name in names:
            running.start(name)
        yield running
    finally:
        haproxy.stop()
        for replica in running.replicas.values():
            replica.stop()
        postgres.remove()


def say(http: httpx.Client, session: str, text: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4,
            "temperature": 0, **extra}  # fmt: skip
    reply = http.post("/v1/chat/completions", json=body, headers={"X-Session-Id": session})
    assert reply.status_code == 200, reply.text
    return reply


def replica(reply: httpx.Response) -> str:
    return reply.headers["x-llmup-replica"]


def test_the_shipped_config_is_valid_haproxy() -> None:
    import subprocess

    done = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True)
    assert done.returncode == 0 and "Configuration file is valid" in done.stdout, done.stderr
    text = HAPROXY_CFG.read_text()
    assert "balance hdr(X-Session-Id)" in text and "hash-type consistent" in text
    assert "balance leastconn" in text and "/health" in text


def test_ids_and_body_fields_reach_the_replica_they_name(cluster) -> None:
    """A Responses id or a conversation id goes to the replica named in it (an unknown one
    is a 404 from that replica); a session named in the body goes where the same session
    named in the header goes."""
    http = cluster.http()
    for _ in range(3):  # least connections would alternate; these never do
        for name in ("r1", "r2"):
            resp, conv = routed_id("resp", name), routed_id("conv", name)
            answers = [
                http.post("/v1/responses", json={"input": "x", "previous_response_id": resp}),
                http.post("/v1/responses", json={"input": "x", "conversation": conv}),
                http.post("/v1/responses", json={"input": "x", "conversation": {"id": conv}}),
                http.get(f"/v1/responses/{resp}"),
                http.get(f"/v1/conversations/{conv}/items"),
            ]
            assert [replica(a) for a in answers] == [name] * len(answers)
    for session in ("body-0", "body-1", "body-2", "body-3"):
        by_header = replica(say(http, session, "by header"))
        body = {"model": MODEL, "messages": [{"role": "user", "content": "by body"}],
                "max_tokens": 2, "session_id": session}  # fmt: skip
        by_body = http.post("/v1/chat/completions", json=body)
        assert by_body.status_code == 200 and replica(by_body) == by_header
        assert replica(http.get(f"/v1/sessions/{session}")) == by_header


def test_a_response_chain_stays_on_the_replica_holding_its_kv(cluster) -> None:
    """A chain's first response lands anywhere (least connections); its id names that
    replica, so every `previous_response_id` after it reaches the same KV cache, and a
    conversation's requests reach the replica that made it."""
    http = cluster.http()
    body = {"model": MODEL, "input": "hello world", "max_output_tokens": 3, "temperature": 0}
    first = http.post("/v1/responses", json=body)
    assert first.status_code == 200, first.text
    made_on, latest = replica(first), first.json()
    assert latest["id"].split("_")[1] == made_on
    for turn in range(3):
        reply = http.post(
            "/v1/responses",
            json={**body, "input": f"turn {turn}", "previous_response_id": latest["id"]},
        )
        assert reply.status_code == 200 and replica(reply) == made_on, reply.text
        cached = reply.json()["usage"]["input_tokens_details"]["cached_tokens"]
        assert cached >= latest["usage"]["input_tokens"]  # the same replica's KV, reused
        latest = reply.json()
    assert replica(http.get(f"/v1/responses/{latest['id']}")) == made_on
    conv = http.post("/v1/conversations", json={})
    assert conv.status_code == 200
    in_conv = http.post("/v1/responses", json={**body, "conversation": conv.json()["id"]})
    assert in_conv.status_code == 200 and replica(in_conv) == replica(conv)


def test_sessions_stay_put_fail_over_with_their_history_and_the_replica_rejoins(cluster) -> None:
    http = cluster.http()
    answered: dict[str, list[str]] = {s: [] for s in SESSIONS}
    prompt_tokens: dict[str, list[int]] = {s: [] for s in SESSIONS}
    for turn in (1, 2):
        for session in SESSIONS:
            reply = say(http, session, f"turn {turn} of {session}")
            answered[session].append(replica(reply))
            prompt_tokens[session].append(reply.json()["usage"]["prompt_tokens"])
    owner = {s: names[0] for s, names in answered.items()}
    assert all(len(set(names)) == 1 for names in answered.values()), answered
    assert set(owner.values()) == {"r1", "r2"}, owner  # these ids hash onto both replicas
    stateless = {replica(say(http, "", "no session")) for _ in range(6)}  # least connections
    assert stateless <= {"r1", "r2"}

    cluster.kill("r1")
    moved = [s for s in SESSIONS if owner[s] == "r1"]
    for turn in (3, 4):
        for session in SESSIONS:
            reply = say(http, session, f"turn {turn} of {session}")
            assert replica(reply) == "r2", (session, turn)
            prompt_tokens[session].append(reply.json()["usage"]["prompt_tokens"])
    for session in SESSIONS:
        stored = http.get(f"/v1/sessions/{session}").json()
        users = [m["content"] for m in stored["messages"] if m["role"] == "user"]
        assert users == [f"turn {t} of {session}" for t in (1, 2, 3, 4)]  # nothing lost
        # each turn's prompt held the whole history: r2 read r1's turns from PostgreSQL
        assert prompt_tokens[session] == sorted(prompt_tokens[session]), prompt_tokens[session]
        assert len(set(prompt_tokens[session])) == 4
    assert moved

    cluster.start("r1")
    late = {s: replica(say(http, s, f"hello from {s}")) for s in NEW_SESSIONS}
    assert "r1" in late.values(), late  # the restarted replica takes sessions again
    for session in moved:  # and its old sessions come back to it, history intact
        reply = say(http, session, f"turn 5 of {session}")
        assert replica(reply) == "r1" and reply.json()["usage"]["prompt_tokens"] > max(
            prompt_tokens[session]
        )


def test_a_turn_in_flight_is_stored_whole_or_not_at_all_and_a_retry_is_one_turn(cluster) -> None:
    http = cluster.http()
    session = "in-flight"
    first = say(http, session, "before the crash")
    victim = replica(first)
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "a long answer please"}],
        "max_tokens": 600, "temperature": 0, "stream": True, "logit_bias": NO_EOS,
    }  # fmt: skip
    headers = {"X-Session-Id": session, "Idempotency-Key": "turn-2-of-in-flight"}
    events: list[str] = []
    try:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as stream:
            assert replica(stream) == victim
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 2:
                        cluster.kill(victim)  # mid-reply: the turn was never acknowledged
    except httpx.HTTPError:
        pass  # the connection dies with the replica
    assert events and events[-1] != "data: [DONE]"
    assert http.get(f"/v1/sessions/{session}").json()["turns"] == 1  # not half, not whole

    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as retry:
        assert retry.status_code == 200 and replica(retry) != victim
        lines = [line for line in retry.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and "x-llmup-session-replayed" not in retry.headers
    assert http.get(f"/v1/sessions/{session}").json()["turns"] == 2

    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as again:
        assert again.headers["x-llmup-session-replayed"] == "1"  # the stored reply, not a third
        list(again.iter_lines())
    stored = http.get(f"/v1/sessions/{session}").json()
    assert stored["turns"] == 2
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == [
        "before the crash", "a long answer please"
    ]  # fmt: skip
    cluster.start(victim)
