"""Machine profiles: every shipped profile parses and plans what its reader expects; the
profile is one layer of the settings (defaults < profile < environment < flags); bad files
are one-line errors; a machine that is not the profile's is named in a warning."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import MACHINES, run_cli

from launcher.errors import ProfileError
from launcher.planning import make_plan
from launcher.planning.request import request_from_settings
from launcher.profiles import all_profiles, differences, find_profile, load_profile
from launcher.profiles.listing import profile_request
from launcher.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"

# What a reader of each profile expects it to serve on its own machine.
EXPECTED = {
    "cpu-16g": ("llama-2-7b-chat", "Q8_0", "llama.cpp", []),
    "cpu-64g": ("llama-2-13b-chat", "Q8_0", "llama.cpp", []),
    "apple-m1pro-16g": ("llama-2-7b-chat", "Q6_K", "llama.cpp", ["metal:0"]),
    "apple-m2max-96g": ("llama-2-70b-chat", "Q8_0", "llama.cpp", ["metal:0"]),
    "rtx3060-12g": ("llama-2-13b-chat", "Q5_K_S", "llama.cpp", ["cuda:0"]),
    "rtx4090-24g": ("llama-2-13b-chat", "Q8_0", "llama.cpp", ["cuda:0"]),
    "rtx-a6000-48g": ("llama-2-70b-chat", "Q4_K_M", "llama.cpp", ["cuda:0"]),
    "2x-rtx-a6000": ("llama-2-70b-chat", "Q8_0", "llama.cpp", ["cuda:0", "cuda:1"]),
    "a100-80g": ("llama-2-70b-chat", "Q8_0", "llama.cpp", ["cuda:0"]),
}


def home() -> Path:
    return Settings().home


def test_every_shipped_profile_is_in_the_table():
    assert sorted(p.stem for p in PROFILES.glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_plans_what_its_reader_expects(name):
    profile = find_profile(name, home())
    plan = make_plan(profile_request(profile))
    model, quant, backend, devices = EXPECTED[name]
    assert (plan.model.id, plan.quant, plan.backend) == (model, quant, backend)
    assert [d.device for d in plan.placement.devices] == devices
    assert plan.placement.offload == ("full" if devices else "cpu")
    assert profile.accelerator == ("cuda" if devices and devices[0].startswith("cuda") else "cpu")


def test_profiles_command_lists_each_with_its_plan():
    result = run_cli("profiles", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["profiles"]}
    assert set(rows) == set(EXPECTED)
    for name, (model, quant, backend, devices) in EXPECTED.items():
        plan = rows[name]["plan"]
        assert (plan["model"]["id"], plan["quant"], plan["backend"]) == (model, quant, backend)
        assert [d["device"] for d in plan["placement"]["devices"]] == devices
    table = run_cli("profiles")
    assert table.returncode == 0, table.stderr
    assert "2x-rtx-a6000" in table.stdout and "cuda:1" in table.stdout
    assert "llama-2-70b-chat" in table.stdout


def plan_json(*args: str, env: dict | None = None) -> dict:
    result = run_cli("plan", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_profile(folder: Path, name: str, settings: str, machine: str = "cpu-16gb") -> Path:
    snapshot = json.loads((MACHINES / f"{machine}.json").read_text())
    system = "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in snapshot["system"].items() if v is not None
    )
    text = (
        f'name = "{name}"\ndescription = "test machine"\n\n{settings}\n\n'
        f"[hardware]\ngpus = []\n\n[hardware.system]\n{system}\n"
    )
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def test_precedence_defaults_profile_environment_flags(tmp_path):
    path = write_profile(
        tmp_path, "mine", '[settings.planning]\ncontext = 2048\nkv_cache = "q8_0"\nmodel = "7b"'
    )
    args = ["--profile", str(path), "--hardware", "profile"]
    plan = plan_json(*args)
    assert (plan["context"], plan["settings"]["kv_cache_type"]) == (2048, "q8_0")
    env = {"LLMUP_PLANNING__CONTEXT": "1024"}
    plan = plan_json(*args, env=env)
    assert (plan["context"], plan["settings"]["kv_cache_type"]) == (1024, "q8_0")
    plan = plan_json(*args, "--context", "512", "--kv-cache", "f16", env=env)
    assert (plan["context"], plan["settings"]["kv_cache_type"]) == (512, "f16")
    assert plan_json(*args)["model"]["id"] == "llama-2-7b-chat"
    assert plan_json(*args, "--model", "13b")["model"]["id"] == "llama-2-13b-chat"
    # without the profile, the defaults
    plain = plan_json("--hardware", str(MACHINES / "cpu-16gb.json"))
    assert (plain["context"], plain["settings"]["kv_cache_type"]) == (4096, "f16")


def test_a_pinned_model_lifts_the_size_cap():
    args = ["--profile", "cpu-64g", "--hardware", "profile"]
    assert plan_json(*args)["model"]["id"] == "llama-2-13b-chat"
    assert plan_json(*args, "--max-model", "7b")["model"]["id"] == "llama-2-7b-chat"
    pinned = plan_json(*args, "--model", "70b")
    assert (pinned["model"]["id"], pinned["quant"]) == ("llama-2-70b-chat", "Q6_K")


def test_serve_lays_profile_port_under_environment_and_flags(tmp_path):
    from launcher.cli.commands import command_settings
    from launcher.cli.serving import serve_settings

    path = write_profile(tmp_path, "porty", "[settings.proxy]\nport = 8123")
    settings, profile = command_settings(str(path))
    assert (settings.proxy.port, profile.name) == (8123, "porty")
    settings = serve_settings(settings, None, 9001, None, False, "docker")
    assert (settings.proxy.port, settings.runtime) == (9001, "docker")


def test_user_profiles_are_listed_and_shadow_shipped_ones(tmp_path):
    folder = home() / "profiles"
    folder.mkdir(parents=True)
    write_profile(folder, "cpu-16g", '[settings.planning]\nmodel = "13b"')
    write_profile(folder, "my-box", "")
    names = [p.name for p in all_profiles(home())]
    assert names.count("cpu-16g") == 1 and "my-box" in names
    assert find_profile("cpu-16g", home()).path == folder / "cpu-16g.toml"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('name = "bad"\n[settings\n', "is not valid TOML"),
        ("[settings.planning]\ncontxt = 2048", "unknown setting settings.planning.contxt"),
        ("[settings.planning]\ncontext = -1", "settings.planning.context: Input should be"),
        ("[settings.proxy]\napi_keys = ['k']", "settings.proxy.api_keys does not belong"),
        ("[settings]\nparallel_universe = 1", "unknown setting settings.parallel_universe"),
        ("", "hardware is missing"),
    ],
)
def test_malformed_profile_is_one_line_exit_2(tmp_path, body, needle):
    path = tmp_path / "bad.toml"
    path.write_text(body if body.startswith("name") else f'name = "bad"\ndescription = "x"\n{body}')
    if needle != "hardware is missing" and not body.startswith("name"):
        path.write_text(
            path.read_text() + '\n[hardware]\ngpus = []\n[hardware.system]\nos = "linux"'
            '\narch = "x86_64"\ncpu_cores = 2\nram_total_mib = 1\nram_available_mib = 1\n'
        )
    result = run_cli("plan", "--profile", str(path), "--hardware", "profile")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and needle in lines[0], result.stderr


def test_name_must_match_the_file(tmp_path):
    path = write_profile(tmp_path, "one", "")
    moved = path.rename(tmp_path / "two.toml")
    with pytest.raises(ProfileError, match="must match the file name"):
        load_profile(moved)


def test_unknown_profile_names_the_known_ones():
    result = run_cli("serve", "--profile", "nope")
    assert result.returncode == 2
    assert "unknown profile 'nope'" in result.stderr and "rtx4090-24g" in result.stderr


def test_hardware_profile_needs_a_profile():
    result = run_cli("plan", "--hardware", "profile")
    assert result.returncode == 2 and "add --profile NAME" in result.stderr


def test_warning_names_another_gpu():
    result = run_cli(
        "plan", "--profile", "rtx4090-24g", "--hardware", str(MACHINES / "rtx3060-12gb.json")
    )
    assert result.returncode == 0, result.stderr
    assert "not the one profile rtx4090-24g describes" in result.stderr
    assert "cuda:0 is NVIDIA GeForce RTX 3060, the profile expects NVIDIA GeForce RTX 4090" in (
        " ".join(result.stderr.split())
    )
    assert "llama-2-13b-chat" in result.stdout  # the profile's pin, planned on this machine


def test_warning_names_less_free_vram():
    profile = find_profile("2x-rtx-a6000", home())
    busy = json.loads((MACHINES / "a6000x2-busy.json").read_text())
    from launcher.hardware.snapshot import HardwareSnapshot

    found = differences(profile.hardware, HardwareSnapshot.model_validate(busy))
    assert found == ["cuda:1 has 13.5 GiB free, the profile expects 47.2 GiB"]


def test_no_warning_on_the_profiles_own_machine(tmp_path):
    profile = find_profile("rtx4090-24g", home())
    snap = tmp_path / "same.json"
    snap.write_text(profile.hardware.model_dump_json())
    result = run_cli("plan", "--profile", "rtx4090-24g", "--hardware", str(snap))
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_detected_machine_differs_from_cpu_profile_in_a_warning():
    result = run_cli("plan", "--profile", "a100-80g")
    assert "not the one profile a100-80g describes" in result.stderr
    assert "the profile expects 1 GPU (NVIDIA A100-SXM4-80GB)" in " ".join(result.stderr.split())


def test_profiles_ship_inside_the_wheel(tmp_path):
    """`llmup profiles` must work after `pip install .`: the wheel carries profiles/."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("llmup-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if n.startswith("launcher/profiles/data/"))
    assert shipped == sorted(p.name for p in PROFILES.glob("*.toml"))


def test_a_zero_flag_still_wins_over_the_profile(tmp_path):
    profile = find_profile("rtx3060-12g", tmp_path)
    cfg = load_settings(profile.pinned).planning
    assert request_from_settings(cfg, profile.hardware).reserve_mib == 768  # the pin
    req = request_from_settings(cfg, profile.hardware, reserve_mib=0, min_tokens_per_s=0.0)
    assert (req.reserve_mib, req.min_tokens_per_s) == (0, 0.0)  # 0 is a value, not "unset"


def test_a_size_cap_from_above_is_not_lifted_by_the_profiles_pin(tmp_path, monkeypatch):
    profile = find_profile("2x-rtx-a6000", tmp_path)  # pins model = "70b"

    def chosen(**flags):
        cfg = load_settings(profile.pinned).planning
        req = request_from_settings(cfg, profile.hardware, **flags)
        return make_plan(req).model.id

    assert chosen() == "llama-2-70b-chat"
    assert chosen(max_model="7b") == "llama-2-7b-chat"  # the flag's choice replaces the pin
    monkeypatch.setenv("LLMUP_PLANNING__MAX_MODEL", "13b")
    assert chosen() == "llama-2-13b-chat"  # so does the environment's
    assert chosen(model="70b") == "llama-2-70b-chat"  # and a flag's pin lifts that cap
