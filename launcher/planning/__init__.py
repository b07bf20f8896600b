"""Stage 2: the largest model that fits, as a Plan. Entry point: `make_plan(PlanRequest)`."""

from launcher.planning.plan import Plan, load_plan
from launcher.planning.planner import make_plan
from launcher.planning.request import PlanRequest

__all__ = ["Plan", "PlanRequest", "load_plan", "make_plan"]
