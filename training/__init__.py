"""Training backends behind one interface (`training.backend.TrainingBackend`), picked by name."""

from typing import TYPE_CHECKING

from config.errors import UserError
from config.schema import SluiceConfig

if TYPE_CHECKING:  # torch loads only when a backend is built
    import torch

    from training.backend import TrainingBackend


def _torch_backend(config: SluiceConfig, device: "torch.device") -> "TrainingBackend":
    from training.torch_backend import TorchBackend

    return TorchBackend(config, device)


BACKENDS = {"torch": _torch_backend}


def check_backend_config(config: SluiceConfig) -> None:
    """Refuse settings the chosen backend cannot honour, rather than ignore them."""
    t = config.train
    if t.backend not in BACKENDS:
        raise UserError(
            f"train.backend={t.backend!r} is not a known backend; use one of {sorted(BACKENDS)}"
        )
    if t.backend == "torch":
        p = t.parallel
        sizes = {
            "tensor": p.tensor,
            "pipeline": p.pipeline,
            "context": p.context,
            "expert": p.expert,
        }
        other = {k: v for k, v in sizes.items() if v != 1}
        if other:
            names = ", ".join(f"train.parallel.{k}={v}" for k, v in other.items())
            raise UserError(
                f"{names}: the torch backend is data-parallel only (every rank holds the whole "
                f"model); set them to 1"
            )


def create_backend(config: SluiceConfig, device: "torch.device") -> "TrainingBackend":
    check_backend_config(config)
    return BACKENDS[config.train.backend](config, device)
