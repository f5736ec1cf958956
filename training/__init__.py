"""Training backends behind one interface (`training.backend.TrainingBackend`), picked by name."""

import torch

from config.errors import UserError
from config.schema import SluiceConfig
from training.backend import TrainingBackend


def _torch_backend(config: SluiceConfig, device: torch.device) -> TrainingBackend:
    from training.torch_backend import TorchBackend

    return TorchBackend(config, device)


BACKENDS = {"torch": _torch_backend}


def check_backend_type(name: str) -> None:
    if name not in BACKENDS:
        raise UserError(
            f"train.backend={name!r} is not a known backend; use one of {sorted(BACKENDS)}"
        )


def create_backend(config: SluiceConfig, device: torch.device) -> TrainingBackend:
    check_backend_type(config.train.backend)
    return BACKENDS[config.train.backend](config, device)
