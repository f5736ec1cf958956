"""The driver's handles on its actor groups, each with a few coarse verbs.

`TrainGroup.train(shares, normalizer)` and `RolloutGroup.generate(prompts)` are what the driver
loop reads like; the per-actor fan-out, placement and start-up order live here.
"""

from collections.abc import Callable

import ray

from actors import deadline
from actors.rollout_actor import EvalResult, RolloutActor, RolloutResult
from actors.train_actor import TrainActor
from config.schema import SluiceConfig
from data.prompts import PromptRecord
from data.schema import RolloutBatchRef
from inference.sglang.engine import EngineSite
from placement.groups import Placement, Role
from training.backend import TrainStats
from weights.manifest import Bucket

# The classes stay plain (importable by name, so Ray pickles them by reference); these are
# their Ray actor versions.
RemoteTrainActor = ray.remote(TrainActor)
RemoteRolloutActor = ray.remote(RolloutActor)


class TrainGroup:
    """One TrainActor per rank, joined in one torch.distributed group.

    Ranks of one model replica (tensor / pipeline / expert peers) train on the same share of
    rows; there are `data_parallel_size` shares. Weight export and checkpoints are collectives
    of every rank (`_all`); rank 0 sends or writes, and its answer is returned.
    """

    def __init__(self, config: SluiceConfig, placement: Placement):
        world = config.train.num_workers
        self.actors = [
            RemoteTrainActor.options(
                name=f"sluice-train-{rank}", **placement.actor_options(Role.TRAIN, rank)
            ).remote(config, rank, world)
            for rank in range(world)
        ]
        address, port = deadline.get(self.actors[0].pick_master.remote())
        self.share_of_rank: list[int] = deadline.get(
            [a.init_process_group.remote(address, port) for a in self.actors]
        )

    @property
    def leader(self) -> ray.actor.ActorHandle:
        """Rank 0: joins the weight-broadcast group and sends the gathered weights."""
        return self.actors[0]

    @property
    def data_parallel_size(self) -> int:
        return max(self.share_of_rank) + 1

    def train(self, shares: list[list[RolloutBatchRef]], normalizer: float) -> list[TrainStats]:
        """One optimizer step on every rank; `shares[d]` are data-parallel rank d's batches."""
        return deadline.get(
            [
                a.train.remote(shares[d], normalizer)
                for a, d in zip(self.actors, self.share_of_rank, strict=True)
            ]
        )

    def broadcast_weights(self, plan: list[Bucket], version: int) -> ray.ObjectRef:
        """Start the export on every rank; the returned reference resolves to rank 0's stats
        once every rank is done."""
        calls = [a.broadcast_weights.remote(plan, version) for a in self.actors]
        return _first_when_all_done.remote(*calls)

    def begin_ipc_export(self, serving: set[int]) -> None:
        """Start a CUDA-IPC export; the ranks in `serving` pack each bucket on their GPU and
        hand out handles to it (one per engine rank sharing that GPU)."""
        deadline.get([a.begin_ipc_export.remote(r in serving) for r, a in enumerate(self.actors)])

    def ipc_bucket(self, bucket: Bucket) -> dict[int, str]:
        """Every rank takes part in gathering `bucket`; {serving rank: handle text}."""
        handles = deadline.get([a.ipc_bucket.remote(bucket) for a in self.actors])
        return {rank: h for rank, h in enumerate(handles) if h is not None}

    def end_ipc_export(self) -> None:
        deadline.get([a.end_ipc_export.remote() for a in self.actors])

    def weight_checksums(self) -> dict[str, str]:
        return self._all(lambda a: a.weight_checksums.remote())

    def named_weights(self) -> dict:
        return self._all(lambda a: a.named_weights.remote())

    def save_hf(self, path: str) -> None:
        self._all(lambda a: a.save_hf.remote(path))

    def save_checkpoint(self, directory: str) -> None:
        self._all(lambda a: a.save_checkpoint.remote(directory))

    def load_checkpoint(self, directory: str, with_optimizer: bool) -> None:
        self._all(lambda a: a.load_checkpoint.remote(directory, with_optimizer))

    def _all(self, call: Callable[[ray.actor.ActorHandle], ray.ObjectRef]):
        """Run `call` on every rank at once; rank 0's result."""
        return deadline.get([call(a) for a in self.actors])[0]


@ray.remote(num_cpus=0)
def _first_when_all_done(first, *others):
    """Resolves when every argument has (Ray resolves them all before calling)."""
    return first


class RolloutGroup:
    """One RolloutActor per engine; prompt groups are split evenly across engines."""

    def __init__(self, config: SluiceConfig, placement: Placement):
        self.config = config
        serving = config.rollout.engine == "sglang"
        self.actors = [
            RemoteRolloutActor.options(
                name=f"sluice-rollout-{e}", **placement.actor_options(Role.ENGINE, e)
            ).remote(config, e, engine_site(placement, e) if serving else None)
            for e in range(config.rollout.num_engines)
        ]
        self._next_group_id = 0
        self.connect_peers()

    def connect_peers(self) -> None:
        """Tell every serving engine the others' URLs (it balances and retries over them)."""
        urls = [u for u in deadline.get([a.url.remote() for a in self.actors]) if u is not None]
        if urls:
            deadline.get([a.connect_peers.remote(urls) for a in self.actors])

    def ensure_running(self) -> bool:
        """Restart dead engines (each reports its log tail); True if any restarted."""
        restarted = any(deadline.get([a.ensure_running.remote() for a in self.actors]))
        if restarted:
            self.connect_peers()
        return restarted

    def release_memory(self) -> None:
        deadline.get([a.release_memory.remote() for a in self.actors])

    def resume_memory(self, regions: tuple[str, ...]) -> None:
        deadline.get([a.resume_memory.remote(regions) for a in self.actors])

    def generate(self, prompts: list[PromptRecord], step: int) -> list[RolloutResult]:
        """Sample every prompt's group; each engine gets whole groups, results stay in the store.

        Engine e samples step s with seed (run seed, s, e), never with a carried-over RNG state."""
        return deadline.get(self.start_generate(prompts, step))

    def start_generate(self, prompts: list[PromptRecord], step: int) -> list[ray.ObjectRef]:
        """`generate` without waiting: one reference per engine to its `RolloutResult`."""
        calls = []
        shares = split_evenly(prompts, len(self.actors))
        for e, (actor, share) in enumerate(zip(self.actors, shares, strict=True)):
            seed = hash((self.config.seed, step, e)) & 0x7FFFFFFF
            calls.append(actor.generate.remote(share, self._next_group_id, seed))
            self._next_group_id += len(share)
        return calls

    @property
    def next_group_id(self) -> int:
        return self._next_group_id

    @next_group_id.setter
    def next_group_id(self, value: int) -> None:
        self._next_group_id = value

    def evaluate(self, prompts: list[PromptRecord]) -> list[EvalResult]:
        shares = split_evenly(prompts, len(self.actors))
        return deadline.get(
            [a.evaluate.remote(s) for a, s in zip(self.actors, shares, strict=True) if s]
        )

    def weight_versions(self) -> list[int]:
        return deadline.get([a.weight_version.remote() for a in self.actors])


def engine_site(placement: Placement, engine: int) -> EngineSite:
    """Where engine `engine`'s servers go: its GPUs per node, and the actor options of the
    helper that runs the server on each node after the first."""
    spans = placement.layout.engine_spans(engine)
    return EngineSite(
        layout=placement.layout,
        gpu_ids=[[placement.gpu_id(slot) for slot in span.slots] for span in spans],
        node_options=[
            placement.actor_options(Role.ENGINE, engine, node_rank=k) for k in range(len(spans))
        ],
    )


def split_evenly[T](items: list[T], parts: int) -> list[list[T]]:
    """Contiguous shares whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    shares, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        shares.append(items[start:end])
        start = end
    return shares
