"""Downloads that fail closed and stay put: checksums from paths-info (olah, a real mirror),
no checksum no file, pinned commits, and what an earlier commit fetched reused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from huggingface_hub import HfApi
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
from support.olahmirror import OlahMirror, lfs_repo

from launcher.catalog.pins import Pins
from launcher.errors import ChecksumError, UnverifiableFileError
from launcher.planning.plan import Source
from launcher.weights.pull import pull

pytestmark = pytest.mark.usefixtures("hub_env")


def home() -> Path:
    return Path(os.environ["LLMUP_HOME"])


# ----- checksums


def test_olah_mirror_flipped_byte_is_caught_through_paths_info(tmp_path, monkeypatch):
    good, bad = fake_gguf(200_000), fake_gguf(200_000)
    mirror = tmp_path / "mirror"
    lfs_repo(mirror, "acme/tiny-gguf", {"good.gguf": good, "bad.gguf": bad}, flip="bad.gguf")
    with OlahMirror(mirror) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        api = HfApi(endpoint=url)
        listing = api.model_info("acme/tiny-gguf", revision="main", files_metadata=True)
        assert all(s.lfs is None and s.blob_id is None for s in listing.siblings)
        with pytest.raises(ChecksumError, match=r"bad.gguf failed verification \(sha256"):
            pull(Source(repo_id="acme/tiny-gguf", files=["bad.gguf"]), progress=False)
        assert blobs(tmp_path, "acme/tiny-gguf") == []  # the corrupt copy is gone
        result = pull(Source(repo_id="acme/tiny-gguf", files=["good.gguf"]), progress=False)
    assert result.path.read_bytes() == good and not result.unverified


def test_a_listing_without_checksums_is_completed_from_paths_info(hub):
    hub.state.bare_listing = True
    data = publish_gguf(hub)
    hub.state.corrupt.add(GGUF_FILE)
    with pytest.raises(ChecksumError):
        pull(gguf_source(), progress=False)
    hub.state.corrupt.clear()
    assert pull(gguf_source(), progress=False).path.read_bytes() == data
    assert any(r.method == "POST" and "/paths-info/" in r.path for r in hub.requests)


def test_no_checksum_anywhere_is_refused_unless_no_verify(hub, tmp_path):
    hub.state.bare_listing, hub.state.paths_info = True, False
    data = publish_gguf(hub)
    with pytest.raises(UnverifiableFileError, match=rf"no checksum for {GGUF_FILE}.*--no-verify"):
        pull(gguf_source(), progress=False)
    assert hub.downloads() == []  # refused before a single byte
    refused = run_cli("pull", "--plan", str(saved_plan(tmp_path, gguf_source())), "--quiet")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    accepted = pull(gguf_source(), progress=False, verify=False)
    assert accepted.path.read_bytes() == data and accepted.unverified == (GGUF_FILE,)
    assert f"NOT verified (--no-verify): {GGUF_FILE}" in accepted.summary()


# ----- pins


def test_a_moved_branch_does_not_move_the_pull(hub):
    data = publish_gguf(hub)
    first = pull(gguf_source(), progress=False)
    assert Pins.load(home()).commit(GGUF_REPO, "main") == first.commit  # pinned on first use
    hub.add_repo(GGUF_REPO, {GGUF_FILE: fake_gguf(300_000), "README.md": b"# v2\n"})
    again = pull(gguf_source(), progress=False)
    assert again.commit == first.commit and again.pinned and again.path.read_bytes() == data
    assert len(hub.downloads()) == 1 and "pinned; `llmup pins refresh` moves it" in again.summary()


def refresh(repo: str) -> str:
    done = run_cli("pins", "refresh", repo)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_refresh_to_a_readme_only_commit_downloads_nothing(hub):
    data = publish_gguf(hub)
    first = pull(gguf_source(), progress=False)
    readme_only = hub.add_repo(GGUF_REPO, {GGUF_FILE: data, "README.md": b"# new card\n"})
    assert "(new)" in refresh(GGUF_REPO)
    assert Pins.load(home()).commit(GGUF_REPO, "main") == readme_only
    again = pull(gguf_source(), progress=False)
    assert again.commit == readme_only and again.path.parent.name == readme_only
    assert again.downloaded_bytes == 0 and again.files[0].cached
    assert len(hub.downloads()) == 1 and again.path.resolve() == first.path.resolve()


def test_refresh_to_a_readme_only_commit_reuses_the_joined_file(hub, tmp_path):
    original = publish_split(hub, tmp_path)
    first = pull(split_source(), progress=False)
    a, b = split_source().join.parts
    half = len(original) // 2
    halves = {a: original[:half], b: original[half:]}
    readme_only = hub.add_repo(SPLIT_REPO, {**halves, "README.md": b"new card"})
    refresh(SPLIT_REPO)
    again = pull(split_source(), progress=False)
    assert again.commit == readme_only and again.joined and again.downloaded_bytes == 0
    assert len(hub.downloads()) == 2  # the first pull's two halves, nothing since
    assert again.path.parent.name == readme_only and again.path.read_bytes() == original
    assert again.path.stat().st_ino == first.path.stat().st_ino  # one joined copy on disk


def test_pins_show_lists_catalog_sources_and_pulled_ones(hub):
    publish_gguf(hub)
    pinned = pull(gguf_source(), progress=False).commit
    shown = run_cli("pins", "show", "--json")
    rows = {(r["repo_id"], r["revision"]): r["commit"] for r in json.loads(shown.stdout)["pins"]}
    assert rows[(GGUF_REPO, "main")] == pinned
    assert rows[("TheBloke/Llama-2-70B-Chat-GPTQ", "gptq-4bit-32g-actorder_True")] is None
    shipped = home().parent / "shipped.json"  # LLMUP_PINS_FILE: pins to start from
    shipped.write_text(json.dumps({"pins": {GGUF_REPO: {"main": "a" * 40}}}))
    assert Pins.load(home(), shipped).commit(GGUF_REPO, "main") == pinned  # the home's wins
    assert Pins.load(home(), shipped).commit(GGUF_REPO, "other") is None
    unknown = run_cli("pins", "refresh", "nobody/nothing")
    assert unknown.returncode == 2 and "not a source" in unknown.stderr
