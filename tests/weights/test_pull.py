"""`launcher.weights.pull` against a local hub (tests/support/hubserver.py) with the real hub
client."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from support.hub_fixtures import (
    GGUF_FILE,
    GGUF_REPO,
    SPLIT_REPO,
    blobs,
    fake_gguf,
    gguf_source,
    publish_gguf,
    publish_split,
    saved_plan,
    split_source,
)

from launcher.catalog.loader import load_catalog
from launcher.errors import (
    AuthError,
    ChecksumError,
    DiskSpaceError,
    HubNotFoundError,
    HubUnreachableError,
    JoinError,
    OfflineMissError,
)
from launcher.planning.plan import Source
from launcher.weights import diskspace
from launcher.weights import join as join_module
from launcher.weights.pull import pull

pytestmark = pytest.mark.usefixtures("hub_env")

GPTQ_BRANCH = "gptq-4bit-32g-actorder_True"


def gptq_source() -> Source:
    gptq = load_catalog().get("llama-2-7b-chat").gptq
    variant = next(v for v in gptq.variants if v.branch == GPTQ_BRANCH)
    return Source(
        repo_id=gptq.repo_id,
        revision=GPTQ_BRANCH,
        files=list(gptq.files),
        download_bytes=variant.bytes,
    )


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_full_pull_then_second_pull_is_cached(hub, tmp_path):
    data = publish_gguf(hub)
    first = pull(gguf_source(), progress=False)
    assert first.path.name == GGUF_FILE and first.path.read_bytes() == data
    assert first.path.is_relative_to(tmp_path / "hf" / "hub")  # the standard hub cache
    assert [(f.name, f.size, f.cached) for f in first.files] == [(GGUF_FILE, len(data), False)]
    assert first.downloaded_bytes == len(data)
    assert len(hub.downloads()) == 1  # README.md is not part of the plan
    second = pull(gguf_source(), progress=False)
    assert second.path == first.path and second.files[0].cached
    assert second.downloaded_bytes == 0 and len(hub.downloads()) == 1  # no GET for the bytes
    assert "1 file(s)" in second.summary() and str(first.cache_dir) in second.summary()


def test_interrupted_download_resumes_without_resending(hub):
    """The hub client keeps what it wrote (whole 10 MiB read chunks) and asks for the rest."""
    data = publish_gguf(hub, size=25_000_000)
    hub.state.cut_after[GGUF_FILE] = 21_000_000
    result = pull(gguf_source(), progress=False)
    assert result.path.read_bytes() == data
    gets = hub.downloads(GGUF_FILE)
    assert len(gets) == 2 and gets[0].sent == 21_000_000
    start = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert start >= 20 * 2**20 and gets[1].status == 206 and gets[1].sent == len(data) - start
    assert sum(g.sent for g in gets) < 1.2 * len(data)


def test_corrupted_byte_is_caught_and_only_that_blob_deleted(hub, tmp_path):
    original = publish_split(hub, tmp_path)
    part_a, part_b = split_source().join.parts
    hub.state.corrupt.add(part_b)
    with pytest.raises(ChecksumError, match=rf"{part_b} failed verification.*deleted its blob"):
        pull(split_source(), progress=False)
    remaining = blobs(tmp_path, SPLIT_REPO)
    assert len(remaining) == 1 and remaining[0].stat().st_size == len(original) // 2  # split-a
    snapshot = next((tmp_path / "hf" / "hub").rglob("snapshots/*"))
    assert sorted(p.name for p in snapshot.iterdir()) == [part_a]  # split-b link gone too
    hub.state.corrupt.clear()
    result = pull(split_source(), progress=False)  # split-a stays cached, split-b refetched
    assert result.path.read_bytes() == original
    assert [g.path.rsplit("/", 1)[-1] for g in hub.downloads()] == [part_a, part_b, part_b]


def test_corrupt_cached_blob_is_detected_and_fetched_again(hub, tmp_path):
    data = publish_gguf(hub)
    first = pull(gguf_source(), progress=False)
    blob = first.path.resolve()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, different content
    again = pull(gguf_source(), progress=False)
    assert again.path.read_bytes() == data and not again.files[0].cached
    assert len(hub.downloads()) == 2


def test_split_halves_joined_verified_and_removed(hub, tmp_path):
    original = publish_split(hub, tmp_path)
    source = split_source()
    result = pull(source, progress=False)
    assert result.joined and result.path.name == source.join.output
    assert result.path.read_bytes() == original and not result.path.is_symlink()
    assert blobs(tmp_path, SPLIT_REPO) == []  # halves removed once the joined file verified
    assert sorted(p.name for p in result.path.parent.iterdir()) == [source.join.output]
    assert not list((tmp_path / "hf" / "hub").rglob("*.joining"))
    assert result.downloaded_bytes == len(original)
    again = pull(source, progress=False)
    assert again.path == result.path and again.files[0].cached and len(hub.downloads()) == 2
    offline = pull(source, offline=True, progress=False)
    assert offline.path == result.path


@pytest.mark.parametrize("case", ["single", "split-needs-joined-copy"])
def test_not_enough_disk_is_refused_before_any_byte(hub, tmp_path, monkeypatch, case):
    if case == "single":
        size, source, free = len(publish_gguf(hub)), gguf_source(), 1000
    else:
        size, source = len(publish_split(hub, tmp_path)), split_source()
        free = size + 10  # room for the halves, not for the joined copy as well
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: free)
    with pytest.raises(DiskSpaceError) as err:
        pull(source, progress=False)
    message = str(err.value)
    assert f"{free / 1e9:.2f} GB is free" in message and str(tmp_path / "hf" / "hub") in message
    expected = size if case == "single" else 2 * size
    assert f"need {expected / 1e9:.2f} GB" in message
    assert hub.downloads() == [] and blobs(tmp_path, source.repo_id) == []


def test_offline_hit_uses_only_the_cache(hub, monkeypatch):
    data = publish_gguf(hub)
    online = pull(gguf_source(), progress=False)
    before = len(hub.requests)
    assert pull(gguf_source(), offline=True, progress=False).path == online.path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = pull(gguf_source(), progress=False)
    assert result.offline and result.path.read_bytes() == data
    assert len(hub.requests) == before  # no network at all


def test_offline_miss_names_the_file_and_leaves_nothing(hub, tmp_path):
    publish_gguf(hub)
    before = tree(tmp_path)
    with pytest.raises(OfflineMissError, match=rf"offline: {GGUF_FILE} .* not in the hub cache"):
        pull(gguf_source(), offline=True, progress=False)
    assert tree(tmp_path) == before and hub.requests == []


def test_dry_run_online_lists_sizes_and_cache_state_without_downloading(hub, tmp_path):
    data = publish_gguf(hub)
    before = tree(tmp_path)
    dry = pull(gguf_source(), dry_run=True)
    assert dry.dry_run and [(f.name, f.size, f.cached) for f in dry.files] == [
        (GGUF_FILE, len(data), False)
    ]
    assert dry.missing_bytes == len(data) and dry.path.name == GGUF_FILE
    assert hub.downloads() == [] and tree(tmp_path) == before
    pull(gguf_source(), progress=False)
    assert pull(gguf_source(), dry_run=True).files[0].cached


def test_dry_run_offline_uses_catalog_sizes(hub, tmp_path):
    source = split_source()
    dry = pull(source, dry_run=True, offline=True)
    assert [f.name for f in dry.files] == source.files and not any(f.cached for f in dry.files)
    assert dry.total_bytes == source.download_bytes == dry.missing_bytes
    assert "catalog" in dry.summary() and hub.requests == []
    single = pull(gguf_source(), dry_run=True, offline=True)
    assert single.files[0].size == gguf_source().download_bytes


def test_dry_run_falls_back_to_catalog_when_hub_is_unreachable(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    dry = pull(gguf_source(), dry_run=True)
    assert "unreachable" in dry.summary() and dry.total_bytes == gguf_source().download_bytes
    with pytest.raises(HubUnreachableError, match="cannot reach the hub"):
        pull(gguf_source(), progress=False)


def test_missing_repo_and_missing_file(hub):
    with pytest.raises(HubNotFoundError, match=f"repository {GGUF_REPO} does not exist"):
        pull(gguf_source(), progress=False)
    hub.add_repo(GGUF_REPO, {"llama-2-7b-chat.Q2_K.gguf": fake_gguf(1000)})
    with pytest.raises(HubNotFoundError, match=f"file {GGUF_FILE} is not in {GGUF_REPO}"):
        pull(gguf_source(), progress=False)
    with pytest.raises(HubNotFoundError, match=f"revision '{GPTQ_BRANCH}' does not exist"):
        pull(gguf_source().model_copy(update={"revision": GPTQ_BRANCH}), progress=False)


def test_401_says_how_to_log_in_and_hf_token_is_passed_through(hub, monkeypatch):
    data = publish_gguf(hub)
    hub.state.require_token = "hf_secret"
    with pytest.raises(AuthError, match=r"401 .*`hf auth login` or set HF_TOKEN"):
        pull(gguf_source(), progress=False)
    with pytest.raises(AuthError, match="401"):
        pull(gguf_source(), progress=False, token="hf_wrong")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert pull(gguf_source(), progress=False).path.read_bytes() == data
    assert all(r.authorization == "Bearer hf_secret" for r in hub.downloads())


def test_gptq_branch_snapshot_holds_only_the_allowed_files(hub):
    wanted = {
        "model.safetensors": secrets.token_bytes(50_000),
        "config.json": b'{"a": 1}',
        "quantize_config.json": b'{"bits": 4}',
        "tokenizer.model": b"spm",
        "tokenizer.json": b'{"t": 1}',
        "tokenizer_config.json": b'{"t": 2}',
        "special_tokens_map.json": b'{"t": 3}',
        "generation_config.json": b'{"t": 4}',
    }
    others = {"README.md": b"card", "LICENSE.txt": b"license", "Notice": b"notice"}
    hub.add_repo(gptq_source().repo_id, {**wanted, **others}, revision=GPTQ_BRANCH)
    hub.add_repo(gptq_source().repo_id, {"model.safetensors": b"main branch", **others})
    result = pull(gptq_source(), progress=False)
    assert result.path.is_dir() and result.commit in str(result.path)
    assert {p.name: p.read_bytes() for p in result.path.iterdir()} == wanted
    assert {r.path.rsplit("/", 1)[-1] for r in hub.downloads()} == set(wanted)
    assert all(f"/resolve/{result.commit}/" in r.path for r in hub.downloads())  # pinned commit
    assert pull(gptq_source(), offline=True, progress=False).path == result.path


def test_quiet_pull_prints_nothing(hub, capfd):
    publish_gguf(hub)
    pull(gguf_source(), progress=False)
    assert capfd.readouterr().err == ""


def test_local_source_needs_no_hub(tmp_path, hub):
    model = tmp_path / "m.gguf"
    model.write_bytes(fake_gguf(100))
    result = pull(Source(local_path=str(model)))
    assert result.path == model and result.downloaded_bytes == 0 and hub.requests == []
    assert os.fspath(result.to_dict()["path"]) == str(model)


def test_cli_pull_from_saved_plan(hub, tmp_path):
    data = publish_gguf(hub)
    plan = saved_plan(tmp_path, gguf_source())
    done = run_cli("pull", "--plan", str(plan), "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert Path(result["path"]).read_bytes() == data and result["downloaded_bytes"] == len(data)
    again = run_cli("pull", "--plan", str(plan), "--offline")
    assert again.returncode == 0 and "0.00 GB downloaded" in again.stdout


@pytest.mark.parametrize("args", [["--offline"], []])
def test_cli_pull_errors_are_one_line(hub, tmp_path, args):
    plan = saved_plan(tmp_path, gguf_source())  # the hub has no such repo, the cache is empty
    done = run_cli("pull", "--plan", str(plan), "--quiet", *args)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error:") and GGUF_REPO in done.stderr


def test_failed_join_keeps_halves_and_offline_pull_joins_later(hub, tmp_path, monkeypatch):
    original = publish_split(hub, tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(join_module, "has_gguf_magic", lambda path: False)
        with pytest.raises(JoinError, match="halves are kept"):
            pull(split_source(), progress=False)
    assert len(blobs(tmp_path, SPLIT_REPO)) == 2  # both verified halves still there
    assert not list((tmp_path / "hf" / "hub").rglob("*.gguf*joining"))
    assert not list((tmp_path / "hf" / "hub").rglob("*.gguf"))  # no joined file
    result = pull(split_source(), offline=True, progress=False)
    assert result.path.read_bytes() == original and blobs(tmp_path, SPLIT_REPO) == []


def test_offline_verifies_by_blob_name_when_llmup_home_is_gone(hub, tmp_path):
    data = publish_gguf(hub)
    pulled = pull(gguf_source(), progress=False)
    shutil.rmtree(tmp_path / "llmup")
    assert pull(gguf_source(), offline=True, progress=False).path == pulled.path
    corrupt = data[:-1] + bytes([data[-1] ^ 1])  # a "\0" was no change when the byte was 0
    pulled.path.resolve().write_bytes(corrupt)  # corrupt it behind llmup's back
    shutil.rmtree(tmp_path / "llmup")
    with pytest.raises(ChecksumError, match="deleted its blob"):
        pull(gguf_source(), offline=True, progress=False)
    assert blobs(tmp_path, GGUF_REPO) == []
