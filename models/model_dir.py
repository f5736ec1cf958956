"""Which model folder a process loads, checked before anything reads it.

Kept apart from `models.loading` so that start-up checks and dry runs (which only need the
path) do not import transformers' model code, seconds of CPU per process.
"""

from dataclasses import replace
from pathlib import Path

from config.errors import UserError
from config.schema import BUILTIN_MODEL, ModelConfig


def check_checkpoint_dir(path: str) -> Path:
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise UserError(
            f"model.hf_checkpoint={path} is not a Hugging Face model directory (no config.json); "
            f"point it at one, or use {BUILTIN_MODEL}"
        )
    return directory


def trainer_model(config: ModelConfig) -> ModelConfig:
    """The model the trainers load: `model.train_checkpoint` when given (the bf16 twin of an
    FP8 rollout checkpoint), else `model.hf_checkpoint`."""
    if config.train_checkpoint:
        return replace(config, hf_checkpoint=config.train_checkpoint, train_checkpoint=None)
    return config
