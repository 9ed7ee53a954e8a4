"""A vLLM worker extension (``LLM(worker_extension_cls=...)``): methods mixed into every engine worker and
called through ``llm.collective_rpc``. vLLM's workers already have ``update_weights``, so ours carry a prefix."""

from __future__ import annotations


class WeightSyncExtension:
    def chorus_load_weights(self, path: str) -> None:
        """Load a safetensors file of HF-named weights in place. ``reload_weights`` (not ``model.load_weights``)
        because the CPU linear layers repack their weights after the first forward pass."""
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=iter(load_file(path).items()))

    def chorus_checksum(self) -> float:
        import torch

        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model_runner.model.parameters()))
