"""Training backends behind one interface (`training.backend.TrainingBackend`), picked by name."""

from typing import TYPE_CHECKING

from config.errors import UserError
from config.schema import SluiceConfig, TrainConfig

if TYPE_CHECKING:  # torch loads only when a backend is built
    import torch

    from training.backend import TrainingBackend


def _torch_backend(config: SluiceConfig, device: "torch.device") -> "TrainingBackend":
    from training.torch_backend import TorchBackend

    return TorchBackend(config, device)


def _megatron_backend(config: SluiceConfig, device: "torch.device") -> "TrainingBackend":
    from training.megatron.backend import MegatronBackend

    return MegatronBackend(config, device)


BACKENDS = {"torch": _torch_backend, "megatron": _megatron_backend}


def check_backend_config(config: SluiceConfig, model_readable: bool = True) -> None:
    """Refuse settings the chosen backend cannot honour, rather than ignore them.

    `model_readable` False (a dry run where the checkpoint is not copied yet): the Megatron
    layout is checked without the model's numbers, which start-up checks."""
    t = config.train
    if t.backend not in BACKENDS:
        raise UserError(
            f"train.backend={t.backend!r} is not a known backend; use one of {sorted(BACKENDS)}"
        )
    if t.backend == "megatron":
        from models.model_dir import trainer_model
        from training.megatron.model_config import load_hf_config, model_shape
        from training.megatron.parallel import check_megatron_config

        shape = model_shape(load_hf_config(trainer_model(config.model))) if model_readable else None
        check_megatron_config(t, config.model.dtype, shape)
        _check_replay_with_recompute(config)
    if config.algorithm.routing_replay and model_readable:
        from config.schema import config_json_readable
        from models.model_dir import trainer_model
        from models.routing import replay_routing_shape

        if config_json_readable(trainer_model(config.model).hf_checkpoint):
            replay_routing_shape(config)  # refuses a dense model
    if t.backend == "torch":
        p = t.parallel
        sizes = {
            "tensor": p.tensor,
            "pipeline": p.pipeline,
            "context": p.context,
            "expert": p.expert,
            "expert_tensor": p.expert_tensor,
        }
        other = {k: v for k, v in sizes.items() if v != 1}
        if other:
            names = ", ".join(f"train.parallel.{k}={v}" for k, v in other.items())
            raise UserError(
                f"{names}: the torch backend is data-parallel only (every rank holds the whole "
                f"model); set them to 1, or use train.backend=megatron"
            )
        megatron_only = {
            "train.parallel.sequence": p.sequence,
            "train.optimizer_cpu_offload": t.optimizer_cpu_offload,
            "train.overlap_cpu_optimizer_d2h_h2d": t.overlap_cpu_optimizer_d2h_h2d,
            "train.use_precision_aware_optimizer": t.use_precision_aware_optimizer,
            "train.overlap_cpu_adam_with_forward": t.overlap_cpu_adam_with_forward,
        }
        given = [k for k, v in megatron_only.items() if v]
        if given:
            raise UserError(
                f"{', '.join(given)}: only the megatron backend supports this; "
                f"set train.backend=megatron or remove it"
            )
        _check_torch_recompute(t)


def _check_replay_with_recompute(config: SluiceConfig) -> None:
    """Refuse at start-up what megatron-core's R3 cannot replay under recompute (the model
    build checks it again, whichever key set it)."""
    t = config.train
    granularity = None if t.recompute_granularity == "off" else t.recompute_granularity
    if not config.algorithm.routing_replay or granularity is None:
        return
    from training.megatron.routing_replay import replay_refusals  # imports torch

    problems = replay_refusals(False, granularity, t.parallel.pipeline)
    if problems:
        raise UserError(
            "algorithm.routing_replay=true (R3) cannot be replayed by megatron-core with "
            + "; ".join(problems)
        )


def _check_torch_recompute(t: TrainConfig) -> None:
    """The torch backend's recompute is gradient checkpointing of whole decoder layers."""
    if t.recompute_granularity == "selective":
        raise UserError(
            "train.recompute_granularity=selective (core attention only) is megatron-core's; "
            "the torch backend recomputes whole decoder layers: set it to full, or use "
            "train.backend=megatron"
        )
    chunked = t.recompute_method == "uniform" and t.recompute_num_layers != 1
    if t.recompute_granularity == "full" and chunked:
        raise UserError(
            f"train.recompute_num_layers={t.recompute_num_layers} with "
            f"train.recompute_method=uniform: the torch backend checkpoints layer by layer, not "
            f"in chunks; set it to 1, or use recompute_method=block to recompute only the first "
            f"layers"
        )


def create_backend(config: SluiceConfig, device: "torch.device") -> "TrainingBackend":
    check_backend_config(config)
    return BACKENDS[config.train.backend](config, device)
