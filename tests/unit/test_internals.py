"""actors/internals.py: what each private Ray and vLLM call relies on exists in the installed versions. An upgrade
that moves one fails here, named, rather than in a run (where some of these failures are caught and fall back).
The calls themselves run in the integration tests (weight sync, engine shutdown, actor restarts)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _assigns(cls, attr: str) -> bool:
    """Whether ``cls.__init__`` sets ``self.<attr>``."""
    return f"self.{attr}" in inspect.getsource(cls.__init__)


def test_ray_actor_table_reads_an_actor_by_its_id():
    from ray._private import state
    from ray.actor import ActorHandle

    assert "actor_id" in inspect.signature(state.actors).parameters
    assert "_actor_id" in inspect.getsource(ActorHandle.__init__)


def test_vllm_engine_core_shutdown():
    from vllm import LLM
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.engine.llm_engine import LLMEngine

    assert _assigns(LLM, "llm_engine") and _assigns(LLMEngine, "engine_core")
    assert callable(getattr(EngineCoreClient, "shutdown", None))


def test_vllm_worker_reloads_weights_from_an_iterator():
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert issubclass(CPUWorker, Worker)  # the GPU worker's methods serve the CPU build too
    assert "weights_iterator" in inspect.signature(GPUModelRunner.reload_weights).parameters
    assert "model_runner.reload_weights" in inspect.getsource(Worker.reload_weights)
    assert "self.model_runner =" in inspect.getsource(CPUWorker)  # set when the device is initialised


def test_vllm_reports_processed_logprobs():
    """rollout/engine.py asks for the log-probabilities after temperature and top-p (learners/sampling.py)."""
    from typing import get_args

    from vllm.config.model import LogprobsMode, ModelConfig

    assert "processed_logprobs" in get_args(LogprobsMode)
    assert "logprobs_mode" in {f.name for f in __import__("dataclasses").fields(ModelConfig)}


@pytest.mark.parametrize("package", ["actors", "learners", "rollout", "rewards"])
def test_private_calls_live_in_internals_only(package):
    """No other module reaches into ray._private or vLLM's engine and worker internals."""
    banned = ("ray._private", "_actor_id", "llm_engine", "engine_core", "model_runner", "reload_weights")
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name == "internals.py":
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        tree = ast.parse(code)
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        hits = [b for b in banned if any(b == x or x.startswith(b + ".") for x in names)]
        assert not hits, f"{path.relative_to(ROOT)} uses {hits}: go through actors/internals.py"
