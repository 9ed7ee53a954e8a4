"""Every call chorus makes into Ray's and vLLM's private or internal APIs, in one place. Each may change in any
release of those libraries; tests/unit/test_internals.py pins what each relies on in the installed versions, so an
upgrade that breaks one fails there, named, instead of deep inside a run.

Imports are lazy: this module loads without ray or vllm.
"""

from __future__ import annotations


# --- Ray ---------------------------------------------------------------------------------------------------------


def ray_actor_entry(actor) -> dict:
    """The GCS actor table's entry of ``actor`` (keys ``State``, ``NumRestarts``, ``Address``...). The public
    ``ray.util.state`` needs the dashboard, which chorus does not start; ``ray._private.state`` reads the GCS."""
    from ray._private import state

    return state.actors(actor_id=actor._actor_id.hex())


# --- vLLM --------------------------------------------------------------------------------------------------------


def vllm_shutdown(llm) -> None:
    """Stop an ``LLM``'s engine-core processes now. ``LLM`` has no public close; killed instead, the processes leave
    their shared-memory queues in /dev/shm."""
    llm.llm_engine.engine_core.shutdown()


def vllm_reload_weights(worker, weights) -> None:
    """In a vLLM worker (an ``LLM(worker_extension_cls=...)`` method): load ``weights``, an iterable of (HF name,
    tensor), in place. ``reload_weights``, not the model's ``load_weights``, because the CPU linear layers repack their
    weights after the first forward pass and only the runner's reload redoes that."""
    worker.reload_weights(weights_iterator=weights)


def vllm_worker_model(worker):
    """The ``torch.nn.Module`` a vLLM worker runs."""
    return worker.model_runner.model
