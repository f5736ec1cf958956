"""The driver's handles on its actor groups, each with a few coarse verbs.

`TrainGroup.train(shares, normalizer)` and `RolloutGroup.generate(prompts)` are what the driver
loop reads like; the per-actor fan-out, placement and start-up order live here.
"""

import ray

from actors.rollout_actor import EvalResult, RolloutActor, RolloutResult
from actors.train_actor import TrainActor
from config.schema import SluiceConfig
from data.prompts import PromptRecord
from data.schema import RolloutBatchRef
from placement.groups import Placement, Role
from training.backend import TrainStats

# The classes stay plain (importable by name, so Ray pickles them by reference); these are
# their Ray actor versions.
RemoteTrainActor = ray.remote(TrainActor)
RemoteRolloutActor = ray.remote(RolloutActor)


class TrainGroup:
    """One TrainActor per rank, joined in one torch.distributed group."""

    def __init__(self, config: SluiceConfig, placement: Placement):
        world = config.train.num_workers
        self.actors = [
            RemoteTrainActor.options(
                name=f"sluice-train-{rank}", **placement.actor_options(Role.TRAIN, rank)
            ).remote(config, rank, world)
            for rank in range(world)
        ]
        address, port = ray.get(self.actors[0].pick_master.remote())
        ray.get([a.init_process_group.remote(address, port) for a in self.actors])

    @property
    def leader(self) -> ray.actor.ActorHandle:
        """Rank 0: holds full weights and sends them to the engines."""
        return self.actors[0]

    @property
    def data_parallel_size(self) -> int:
        return len(self.actors)

    def train(self, shares: list[list[RolloutBatchRef]], normalizer: float) -> list[TrainStats]:
        """One optimizer step on every rank; `shares[r]` are rank r's batch references."""
        return ray.get(
            [a.train.remote(s, normalizer) for a, s in zip(self.actors, shares, strict=True)]
        )

    def save_hf(self, path: str) -> None:
        ray.get(self.leader.save_hf.remote(path))


class RolloutGroup:
    """One RolloutActor per engine; prompt groups are split evenly across engines."""

    def __init__(self, config: SluiceConfig, placement: Placement):
        self.config = config
        self.actors = [
            RemoteRolloutActor.options(
                name=f"sluice-rollout-{e}", **placement.actor_options(Role.ENGINE, e)
            ).remote(config, e)
            for e in range(config.rollout.num_engines)
        ]
        self._next_group_id = 0

    def generate(self, prompts: list[PromptRecord]) -> list[RolloutResult]:
        """Sample every prompt's group; each engine gets whole groups, results stay in the store."""
        calls = []
        for actor, share in zip(self.actors, split_evenly(prompts, len(self.actors)), strict=True):
            calls.append(actor.generate.remote(share, self._next_group_id))
            self._next_group_id += len(share)
        return ray.get(calls)

    def evaluate(self, prompts: list[PromptRecord]) -> list[EvalResult]:
        shares = split_evenly(prompts, len(self.actors))
        return ray.get(
            [a.evaluate.remote(s) for a, s in zip(self.actors, shares, strict=True) if s]
        )

    def weight_versions(self) -> list[int]:
        return ray.get([a.weight_version.remote() for a in self.actors])


def split_evenly[T](items: list[T], parts: int) -> list[list[T]]:
    """Contiguous shares whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    shares, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        shares.append(items[start:end])
        start = end
    return shares
