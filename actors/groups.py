"""The driver's handles on its actor groups, each with a few coarse verbs.

`TrainGroup.train(shares, normalizer)` and `RolloutGroup.generate(prompts)` are what the driver
loop reads like; the per-actor fan-out, placement and start-up order live here.
"""

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors import deadline
from actors.rollout_actor import EngineNeedsWeights, EvalResult, RolloutActor, RolloutResult
from actors.train_actor import TrainActor
from config.schema import SluiceConfig
from data.prompts import PromptRecord
from data.schema import RolloutBatchRef
from inference.sglang.engine import EngineSite
from placement.groups import Placement, Role
from training.backend import TrainStats
from weights.manifest import Bucket

RESTART_POLL_S = 0.5
"""How often to ask again an actor that Ray is restarting."""
DEATH_PROBE_S = 10.0
"""How long a training rank's readiness probe may take before it counts as alive (busy)."""

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

    def __init__(self, config: SluiceConfig, placement: Placement, incarnation: int = 0):
        """`incarnation`: how many training groups of this run came before (restarts)."""
        world = config.train.num_workers
        suffix = f"-restart{incarnation}" if incarnation else ""  # names stay unique
        self.actors = [
            RemoteTrainActor.options(
                name=f"sluice-train-{rank}{suffix}", **placement.actor_options(Role.TRAIN, rank)
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

    def dead_ranks(self, probe_s: float = DEATH_PROBE_S) -> list[int]:
        """The ranks whose actor process has died. A live rank answers Ray's readiness probe
        after its current task, so waiting `probe_s` for the probes tells the dead (whose probe
        fails) from the busy ones (still stuck in a collective with a dead peer)."""
        probes = [a.__ray_ready__.remote() for a in self.actors]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=probe_s)
        return [rank for rank, probe in enumerate(probes) if probe in ready and _dies(probe)]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)

    def _all(self, call: Callable[[ray.actor.ActorHandle], ray.ObjectRef]):
        """Run `call` on every rank at once; rank 0's result."""
        return deadline.get([call(a) for a in self.actors])[0]


def _dies(probe: ray.ObjectRef) -> bool:
    try:
        ray.get(probe)
    except RayActorError:
        return True
    return False


@ray.remote(num_cpus=0)
def _first_when_all_done(first, *others):
    """Resolves when every argument has (Ray resolves them all before calling)."""
    return first


@dataclass
class EngineCall:
    """One engine's share of a generation or evaluation: what to re-issue if it fails."""

    engine: int
    method: str
    args: tuple
    ref: ray.ObjectRef


class RolloutGroup:
    """One RolloutActor per engine; prompt groups are split evenly across engines.

    A rollout actor whose process dies is restarted by Ray in its bundle
    (`rollout.max_restarts`). Its unfinished shares go to a live engine with the same
    arguments (prompts, group ids, sampling seed), so no group is lost or sampled twice; while
    it is down it gets no new work, and it generates again only after `ensure_running` has
    reported it and the driver has rebuilt the weight group and synced. If no engine is left
    alive, `rejoin` (set by the driver) waits for the restarts and syncs them first.
    """

    def __init__(self, config: SluiceConfig, placement: Placement):
        self.config = config
        serving = config.rollout.engine == "sglang"
        self.actors = [
            RemoteRolloutActor.options(
                name=f"sluice-rollout-{e}",
                # Ray restarts it in the same bundle; its calls are re-issued by `collect`
                # (never retried by Ray on the new incarnation, which holds stale weights).
                max_restarts=config.rollout.max_restarts,
                max_task_retries=0,
                **placement.actor_options(Role.ENGINE, e),
            ).remote(config, e, engine_site(placement, e) if serving else None)
            for e in range(config.rollout.num_engines)
        ]
        self._next_group_id = 0
        self.down: set[int] = set()
        """Engines whose calls failed since they last rejoined."""
        self.restarts = 0
        """Engines restarted during the run (actor or server), each time it was reported."""
        self.reissued_groups = 0
        """Prompt groups (or evaluation prompts) re-issued to another engine."""
        self.rejoin: Callable[[], None] | None = None
        self.connect_peers()

    def connect_peers(self) -> None:
        """Tell every serving engine the others' URLs (it balances and retries over them)."""
        urls = [u for u in deadline.get([a.url.remote() for a in self.actors]) if u is not None]
        if urls:
            deadline.get([a.connect_peers.remote(urls) for a in self.actors])

    def ensure_running(self) -> bool:
        """Restart dead engines (each reports its log tail) and wait for actors Ray is
        restarting; True if any restarted (it then needs the weight group rebuilt)."""
        restarted = self._on_every_actor_once_up("ensure_running")
        self.down.clear()  # every engine answered: all are up again
        if any(restarted):
            self.restarts += sum(restarted)
            self.connect_peers()
        return any(restarted)

    def _on_every_actor_once_up(self, method: str) -> list[Any]:
        """Call `method` on every actor, asking again those that Ray is still restarting
        (they refuse calls until their constructor has run), within the phase's deadline."""
        results: dict[int, Any] = {}
        waiting = list(range(len(self.actors)))
        while waiting:
            calls = {e: getattr(self.actors[e], method).remote() for e in waiting}
            waiting = []
            for e, ref in calls.items():
                try:
                    results[e] = deadline.get(ref)
                except ActorUnavailableError:
                    waiting.append(e)
            if waiting:
                deadline.check(f"rollout actor(s) {waiting} that Ray is restarting")
                time.sleep(RESTART_POLL_S)
        return [results[e] for e in range(len(self.actors))]

    def release_memory(self) -> None:
        deadline.get([a.release_memory.remote() for a in self.actors])

    def resume_memory(self, regions: tuple[str, ...]) -> None:
        deadline.get([a.resume_memory.remote(regions) for a in self.actors])

    def generate(self, prompts: list[PromptRecord], step: int) -> list[RolloutResult]:
        """Sample every prompt's group; each engine gets whole groups, results stay in the store.

        Engine e samples step s with seed (run seed, s, e), never with a carried-over RNG state."""
        return self.collect(self.start_generate(prompts, step))

    def start_generate(self, prompts: list[PromptRecord], step: int) -> list[EngineCall]:
        """`generate` without waiting: one call per engine, to pass to `collect`."""
        calls = []
        shares = split_evenly(prompts, len(self.actors))
        for e, share in enumerate(shares):
            seed = hash((self.config.seed, step, e)) & 0x7FFFFFFF
            calls.append(self._call(e, "generate", (share, self._next_group_id, seed)))
            self._next_group_id += len(share)
        return calls

    def collect(self, calls: list[EngineCall]) -> list[Any]:
        """The results of `calls`, in order; a share whose engine died is re-issued."""
        results = []
        for call in calls:
            while True:
                try:
                    results.append(deadline.get(call.ref))
                    break
                except (RayActorError, EngineNeedsWeights) as error:
                    call = self._reissue(call, error)
        return results

    def _reissue(self, call: EngineCall, error: Exception) -> EngineCall:
        self.down.add(call.engine)
        live = [e for e in range(len(self.actors)) if e not in self.down]
        if not live:
            if self.rejoin is None:
                raise error
            print(
                "sluice: every engine is down; waiting for their restarts",
                file=sys.stderr,
                flush=True,
            )
            self.rejoin()
            live = list(range(len(self.actors)))
        target = live[call.engine % len(live)]
        cause = "was restarted" if isinstance(error, EngineNeedsWeights) else "died"
        print(
            f"sluice: rollout actor {call.engine} {cause} during {call.method}; its "
            f"{len(call.args[0])} prompt group(s) go to engine {target}",
            file=sys.stderr,
            flush=True,
        )
        self.reissued_groups += len(call.args[0])
        return self._call(target, call.method, call.args)

    def _call(self, engine: int, method: str, args: tuple) -> EngineCall:
        ref = getattr(self.actors[engine], method).remote(*args)
        return EngineCall(engine, method, args, ref)

    @property
    def next_group_id(self) -> int:
        return self._next_group_id

    @next_group_id.setter
    def next_group_id(self, value: int) -> None:
        self._next_group_id = value

    def evaluate(self, prompts: list[PromptRecord]) -> list[EvalResult]:
        shares = split_evenly(prompts, len(self.actors))
        return self.collect([self._call(e, "evaluate", (s,)) for e, s in enumerate(shares) if s])

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
