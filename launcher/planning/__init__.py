"""Stage 2: the largest model that fits, as a Plan. Entry point: `make_plan(PlanRequest)`.

The names are resolved on first use: reading a plan (`launcher.planning.plan`, what the CLI
renders) should not import the planner, the catalog and the memory models with it.
"""

from launcher.lazy import lazy_names

__all__ = ["Plan", "PlanRequest", "load_plan", "make_plan"]
__getattr__ = lazy_names(
    __name__,
    {
        "Plan": "launcher.planning.plan",
        "load_plan": "launcher.planning.plan",
        "make_plan": "launcher.planning.planner",
        "PlanRequest": "launcher.planning.request",
    },
)
