"""A vLLM worker extension (``LLM(worker_extension_cls=...)``): methods mixed into every engine worker and
called through ``llm.collective_rpc``. vLLM's workers already have ``update_weights``, so ours carry a prefix."""

from __future__ import annotations


class WeightSyncExtension:
    def chorus_load_weights(self, path: str) -> None:
        """Load a safetensors file of HF-named weights in place (actors/internals.py says how)."""
        from safetensors.torch import load_file

        from actors.internals import vllm_reload_weights

        vllm_reload_weights(self, iter(load_file(path).items()))

    def chorus_checksum(self) -> float:
        import torch

        from actors.internals import vllm_worker_model

        with torch.no_grad():
            return float(sum(p.double().sum() for p in vllm_worker_model(self).parameters()))
