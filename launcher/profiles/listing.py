"""`llmup profiles`: every profile with the plan it gets on its own hardware."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import NothingFitsError
from launcher.hardware.visible import select_gpus
from launcher.planning.plan import Plan
from launcher.planning.planner import make_plan
from launcher.planning.request import PlanRequest, request_from_settings
from launcher.profiles.loader import Profile, all_profiles
from launcher.settings import load_settings


@dataclass
class ProfilePlan:
    profile: Profile
    plan: Plan | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        p = self.profile
        return {
            "name": p.name,
            "description": p.description,
            "file": str(p.path),
            "accelerator": p.accelerator,
            "settings": p.pinned,
            "plan": self.plan.model_dump(mode="json", exclude={"rejected", "fallbacks"})
            if self.plan
            else None,
            "error": self.error,
        }


def profile_request(profile: Profile) -> PlanRequest:
    """What `llmup plan --profile NAME --hardware profile` asks the planner for."""
    cfg = load_settings(profile.pinned).planning
    return request_from_settings(cfg, select_gpus(profile.hardware, gpus=cfg.gpus))


def profile_plans(home: Path) -> list[ProfilePlan]:
    rows = []
    for profile in all_profiles(home):
        try:
            rows.append(ProfilePlan(profile, make_plan(profile_request(profile))))
        except NothingFitsError as exc:
            rows.append(ProfilePlan(profile, None, str(exc)))
    return rows
