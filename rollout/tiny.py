"""Build a tiny Llama-type model and a character-level tokenizer from a JSON recipe, deterministically.

The recipe (configs/models/*.json) holds ``seed``, ``chars`` (the vocabulary besides the special tokens) and
``llama`` (LlamaConfig fields); the tokenizer also carries a chat template (``CHAT_TEMPLATE``). The same recipe always
gives the same weights, so a cache directory named after the recipe's hash can be reused: nothing is downloaded, and
vLLM and transformers both load the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
# The chat template of every model built here (and of models/base): one letter and a colon open a turn (S: system,
# U: user, T: tool, A: assistant), a newline ends it and the end token ends the assistant's, which is where its
# generation stops. Short, since a character is a token, and each turn appended to the ones before it
# (rollout/chat.py renders conversations turn by turn).
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ 'A:' + m['content'] + eos_token }}"
    "{%- elif m['role'] in ('system', 'user', 'tool') -%}{{ m['role'][0] | upper + ':' + m['content'] + '\n' }}"
    "{%- else -%}{{ raise_exception('unknown role ' + m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'A:' }}{%- endif -%}"
)
# Part of the cache key: a model built before the tokenizer changed (before the chat template) is built again.
TOKENIZER_VERSION = b"chat-1"


def recipe_dir(recipe: str | Path) -> Path:
    """Where a recipe's model lives: $CHORUS_CACHE (default ~/.cache/chorus)/models/<name>-<hash>."""
    recipe = Path(recipe)
    digest = hashlib.sha256(recipe.read_bytes() + TOKENIZER_VERSION).hexdigest()[:10]
    root = Path(os.environ.get("CHORUS_CACHE", Path.home() / ".cache" / "chorus"))
    return root / "models" / f"{recipe.stem}-{digest}"


def build_tokenizer(chars: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(chars)) != len(chars):
        raise ValueError("recipe 'chars' holds a character twice")
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one character, one token
    tok.decoder = decoders.Fuse()  # join characters without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(recipe: str | Path, out_dir: str | Path) -> Path:
    """Write the model and tokenizer of ``recipe`` to ``out_dir`` atomically (temp dir, then rename)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(Path(recipe).read_text())
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(spec["chars"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **spec["llama"],
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process built it first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_model(path: str, build: str) -> str:
    """The model directory to use: ``path`` as given, or the recipe's cache dir, built on first use."""
    if build:
        target = Path(path) if path else recipe_dir(build)
        if not (target / "config.json").is_file():
            build_model(build, target)
        return str(target)
    if not (Path(path) / "config.json").is_file():
        what = "does not exist" if not Path(path).exists() else "holds no config.json"
        raise FileNotFoundError(f"config key 'model.path': '{path}' {what}: set it to a Hugging Face model directory "
                                f"(config.json, weights, tokenizer) that this machine mounts, or use model.build")
    return path
