"""Finding and reading checkpoints: Hugging Face folders (or hub ids) and GGUF files."""

from tokenmill.loader.checkpoint import Checkpoint, load_checkpoint

__all__ = ["Checkpoint", "load_checkpoint"]
