"""The seam between serve and the proxy: which worker serves is decided once from the plan
(`WorkerKind`), and the supervised backend is a `ServedModel` whose live figures come from
the supervisor (one not started yet is "stopped") and whose fixed ones come from the plan."""

from __future__ import annotations

import pytest
from conftest import MACHINES

from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.supervisor import Supervisor
from launcher.errors import UsageError
from launcher.hardware.snapshot import load_snapshot
from launcher.planning import PlanRequest, make_plan
from launcher.proxy.checks import UNSUPPORTED
from launcher.serve import SupervisedModel
from launcher.served import WorkerKind


@pytest.mark.parametrize(
    ("backend", "impl", "kind"),
    [
        ("llama.cpp", None, WorkerKind.LLAMACPP_SLOTS),
        ("llama.cpp", "slots", WorkerKind.LLAMACPP_SLOTS),
        ("llama.cpp", "server", WorkerKind.LLAMACPP_PYTHON),
        ("exllamav2", None, WorkerKind.EXLLAMAV2),
    ],
)
def test_the_worker_kind_of_a_plan(backend, impl, kind):
    assert WorkerKind.of(backend, impl) is kind
    assert kind.keeps_slots == (kind is WorkerKind.LLAMACPP_SLOTS)


def test_no_worker_serves_an_unknown_backend():
    with pytest.raises(UsageError, match="cannot launch the 'vllm' backend"):
        WorkerKind.of("vllm", None)


def test_what_the_proxy_refuses_is_keyed_by_the_kind():
    assert set(UNSUPPORTED) <= set(WorkerKind)
    assert {"grammar", "logit_bias"} <= set(UNSUPPORTED[WorkerKind.EXLLAMAV2])
    # exllamav2's worker takes tools (forced calls) and JSON replies itself (its filters)
    assert "tools" not in UNSUPPORTED[WorkerKind.EXLLAMAV2]
    # llmup's slot worker takes the whole chat API (issue 21), llama-cpp-python's server
    # every field (n and logprobs apart, refused by kind in `check_supported`)
    assert WorkerKind.LLAMACPP_SLOTS not in UNSUPPORTED
    assert WorkerKind.LLAMACPP_PYTHON not in UNSUPPORTED


def test_a_supervised_backend_as_the_proxy_sees_it(tmp_path):
    hardware = load_snapshot(MACHINES / "a6000x2-busy.json")
    plan = make_plan(PlanRequest(hardware=hardware, allow_offload=True, llamacpp_impl="server"))
    assert plan.fallbacks
    spec = BackendSpec(
        name="llama.cpp", command=["true"], port=9, log_path=tmp_path / "b.log", api_key="k"
    )
    served = SupervisedModel.for_plan(Supervisor(spec), plan)
    assert (served.model_id, served.context) == (plan.model.id, plan.context)
    assert served.kind is plan.worker_kind is WorkerKind.LLAMACPP_PYTHON
    assert served.state == "stopped" and served.restarts == 0 and served.ordered_stops == 0
    assert served.auth_headers == {"Authorization": "Bearer k"}
    assert served.base_url == "http://127.0.0.1:9"
    assert "fallbacks" not in served.plan_json and served.plan_json["quant"] == plan.quant
    assert served.plan_summary["model"] == plan.model.id and not served.embeddings
