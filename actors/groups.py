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
from ray.exceptions import ActorUnavailableError, RayActorError, TaskCancelledError

from actors import deadline
from actors.process_exit import actor_processes, wait_for_exit
from actors.rollout_actor import (
    CONCURRENCY_GROUPS,
    PEER_CALLS,
    EngineNeedsWeights,
    RolloutActor,
    RolloutResult,
)
from actors.train_actor import TrainActor
from config.schema import EvalConfig, SluiceConfig
from data.prompts import PromptRecord
from data.schema import RolloutBatchRef
from inference.engine import GenerationAborted
from inference.sglang.engine import EngineSite
from placement.groups import Placement, Role
from rl.evaluation import EvalCounts
from training.backend import TrainStats
from weights.manifest import Bucket

RESTART_POLL_S = 0.5
"""How often to ask again an actor that Ray is restarting."""
DOWN_PROBE_S = 0.2
"""How long an engine that is down gets to answer before the weight update goes on without it."""
PEER_DROP_S = 10.0
"""How long the driver waits for the live engines to drop a peer that went down (they answer
at once, even mid-generation: `drop_peer` has a concurrency group of its own); one that has not
answered by then is not waited for."""
DEATH_PROBE_S = 10.0
"""How long a training rank's readiness probe may take before it counts as alive (busy)."""
KILL_TIMEOUT_S = 60.0
"""How long killed training ranks may take to exit: Ray kills one that has not exited by
itself a few seconds after `ray.kill`, so only a process the kernel cannot end outlasts it."""

# The classes stay plain (importable by name, so Ray pickles them by reference); these are
# their Ray actor versions.
RemoteTrainActor = ray.remote(TrainActor)
RemoteRolloutActor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutActor)


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

    def train(
        self,
        shares: list[list[RolloutBatchRef]],
        normalizer: float,
        advantage_shift_scale: tuple[float, float] | None = None,
    ) -> list[TrainStats]:
        """One step's training on every rank (one optimizer step, or one per mini-batch:
        `training.mini_batches`); `shares[d]` are data-parallel rank d's batches."""
        return deadline.get(
            [
                a.train.remote(shares[d], normalizer, advantage_shift_scale)
                for a, d in zip(self.actors, self.share_of_rank, strict=True)
            ]
        )

    def broadcast_weights(self, plan: list[Bucket], version: int) -> list[ray.ObjectRef]:
        """Start the export on every rank; one reference per rank (rank 0's are the stats).
        The driver waits for them itself: a Ray task that waited for them would need a free
        worker process, and after a fault there is none until Ray has started one (seconds)."""
        return [a.broadcast_weights.remote(plan, version) for a in self.actors]

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
        """The ranks whose actor process has died, as soon as one is known (empty if none is
        within `probe_s`). A live rank answers Ray's readiness probe only after its current
        task, which may be stuck in a collective with the dead one; a dead rank's probe fails."""
        return dead_actors(self.actors, probe_s)

    def kill(self, timeout_s: float = KILL_TIMEOUT_S) -> None:
        """Kill every rank and return once their processes have exited, so that new ranks in
        the same bundles find the GPUs' memory free. `ray.kill` alone returns at once and Ray
        marks the actors dead before their processes are gone (actors/process_exit.py).
        RuntimeError names the ranks still running after `timeout_s`."""
        processes = actor_processes(self.actors)  # before the kill: Ray's record of each rank
        for actor in self.actors:
            ray.kill(actor)
        if processes is None:
            print(
                "sluice: Ray's state API (served by the dashboard) does not know the training "
                "ranks' processes; the new ones start without waiting for the old ones to exit",
                file=sys.stderr,
                flush=True,
            )
            return
        running = wait_for_exit(processes, timeout_s)
        if running:
            raise RuntimeError(
                f"training rank(s) {running} (pid {[processes[r][1] for r in running]}) still "
                f"running {timeout_s:g} s after they were killed: their GPU memory is not free "
                f"for new ranks; look for a process stuck in the GPU driver (state D in ps)"
            )

    def _all(self, call: Callable[[ray.actor.ActorHandle], ray.ObjectRef]):
        """Run `call` on every rank at once; rank 0's result."""
        return deadline.get([call(a) for a in self.actors])[0]


def dead_actors(actors: list[ray.actor.ActorHandle], probe_s: float) -> list[int]:
    """The indices of `actors` whose process has died, as soon as one is known (empty if none
    is within `probe_s`). A live actor answers Ray's readiness probe only after its current
    task, which may be stuck in a collective with the dead one; a dead actor's probe fails (one
    Ray is restarting within a second or two: `ActorUnavailableError`)."""
    probes = [a.__ray_ready__.remote() for a in actors]
    index_of = {probe: i for i, probe in enumerate(probes)}
    dead, pending, end = [], probes, time.monotonic() + probe_s
    while pending and not dead:
        ready, pending = ray.wait(pending, timeout=max(0.0, end - time.monotonic()))
        if not ready:
            break
        if pending:  # and whatever else has answered by now
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            ready += more
        dead = sorted(index_of[probe] for probe in ready if _dies(probe))
    return dead


def _dies(probe: ray.ObjectRef) -> bool:
    try:
        ray.get(probe)
    except RayActorError:
        return True
    return False


@dataclass
class EngineCall:
    """One engine's share of a generation or evaluation: what to re-issue if it fails."""

    engine: int
    method: str
    args: tuple
    ref: ray.ObjectRef


class RolloutGroup:
    """One RolloutActor per engine; prompt groups are split evenly across engines.

    A rollout actor whose process dies, whatever it was doing, is restarted by Ray in its
    bundle (`rollout.max_restarts`); one stuck past its phase's bound is killed so that Ray
    restarts it. Its unfinished shares go to a live engine with the same arguments (prompts,
    group ids, sampling seed), so no group is lost or sampled twice; while it is down it gets
    no new work and the weight group goes on without it; it generates again once
    `check_engines` (before a weight update) finds it up and the driver has rebuilt the group
    with it, so the run does not wait for a restart (minutes for a large model). If no engine
    is left alive, `rejoin` (set by the driver) waits for the restarts and syncs first; the
    run ends only when Ray will restart none of them.

    Serving engines (SGLang) balance their requests over each other's servers: an engine found
    down is dropped from the live engines' server lists at once (a killed actor's server may
    outlive it, with weights no update reaches), and `connect_peers` lists it again once it
    is back.
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
        """Engines that died (a call failed) and have not rejoined since."""
        self.restarts = 0
        """Engines restarted during the run (actor or server), counted when they rejoin."""
        self.reissued_groups = 0
        """Prompt groups (or evaluation prompts) re-issued to another engine."""
        self.rejoin: Callable[[], None] | None = None
        """Set by the driver: waits for every engine and syncs them (when none is live)."""
        self.urls: dict[int, str] = {}
        """The server URL of each serving engine the others were told of (`connect_peers`)."""
        self.late_drops: list[ray.ObjectRef] = []
        """`drop_peer` calls not answered within PEER_DROP_S, waited for before the next
        `connect_peers`."""

    def live(self) -> list[int]:
        """The engines that take work: all but those that died and have not rejoined."""
        return [e for e in range(len(self.actors)) if e not in self.down]

    def connect_peers(self) -> None:
        """Tell every serving engine the others' URLs (it balances and retries over them).

        Its first call is where the driver waits for the engines to finish starting: the
        constructor only launches them, so the trainers can start while the engines load."""
        if self.late_drops:  # (see _drop_peer) their answers, or their actors' deaths
            ray.wait(self.late_drops, num_returns=len(self.late_drops), timeout=PEER_DROP_S)
            self.late_drops = []
        answers = self._on_live("start-up", lambda a: a.url.remote())
        told = {e: url for e, url in answers.items() if url is not None}
        if not told:
            return
        self.urls = dict(told)
        self._on_live("connect_peers", lambda a: a.connect_peers.remote(list(told.values())))
        for e in told.keys() & self.down:  # died while the others were told: drop it again,
            self._drop_peer(told[e])  # now that each of them holds the list it is dropped from

    def check_engines(self, members: list[int]) -> bool:
        """Before a weight update: restart the dead servers of live engines, notice engines
        that died while idle, and take back those Ray has finished restarting (without
        waiting for those it has not). True if the weight group, whose engines are
        `members`, must be rebuilt: an engine restarted, came back, or is gone."""
        changed = False
        calls = {e: a.ensure_running.remote() for e, a in enumerate(self.actors)}
        # An engine known to be down gets a moment to answer; one Ray is still restarting
        # fails at once or takes its constructor's time, and is asked again next time.
        for e in self.down.copy():
            if not ray.wait([calls[e]], timeout=DOWN_PROBE_S)[0]:
                del calls[e]
        for e, call in calls.items():
            try:
                restarted = deadline.get(call)
            except ActorUnavailableError:  # Ray is restarting it
                self._mark_down(e)
                continue
            except RayActorError:  # dead for good: the others go on (`_live_or_rejoined`)
                self.went_down(e, "the check before a weight update")
                continue
            if e in self.down or restarted:
                self.down.discard(e)
                self.restarts += 1
                changed = True
        if changed:
            self.connect_peers()
        return changed or members != self.live()

    def wait_until_all_up(self) -> None:
        """Wait (within the phase's deadline) until Ray has restarted every engine it will
        restart; raise if it will restart none."""
        waiting, lost = sorted(self.down), []
        while waiting:
            still = []
            for e in waiting:
                try:
                    deadline.get(self.actors[e].ensure_running.remote())
                except ActorUnavailableError:
                    still.append(e)
                except RayActorError:
                    lost.append(e)
                else:
                    self.down.discard(e)
                    self.restarts += 1
            waiting = still
            if waiting:
                deadline.check(f"rollout actor(s) {waiting} that Ray is restarting")
                time.sleep(RESTART_POLL_S)
        if not self.live():
            raise self._lost(lost)
        self.connect_peers()

    def _lost(self, engines: list[int]) -> RuntimeError:
        limit = self.config.rollout.max_restarts
        return RuntimeError(
            f"no rollout actor is left: {engines} died and Ray will not restart them (each was "
            f"restarted rollout.max_restarts={limit} times already, or its node is gone)"
        )

    def release_memory(self) -> None:
        self._on_live("release_memory", lambda a: a.release_memory.remote())

    def resume_memory(self, regions: tuple[str, ...]) -> None:
        self._on_live("resume_memory", lambda a: a.resume_memory.remote(regions))

    def _on_live(
        self, verb: str, call: Callable[[ray.actor.ActorHandle], ray.ObjectRef]
    ) -> dict[int, Any]:
        """`call` on every live engine at once; the answers of those that gave one, by engine.
        An engine that dies meanwhile is down (as one that dies generating): the run goes on
        without it until Ray has restarted it and a weight update has reached it."""
        calls = {e: call(self.actors[e]) for e in self.live()}
        answers = {}
        for e, ref in calls.items():
            try:
                answers[e] = deadline.get(ref)
            except RayActorError:
                self.went_down(e, verb)
        return answers

    def went_down(self, engine: int, during: str) -> None:
        """Engine `engine` died (or was killed) during `during`: it takes no work until back."""
        if engine not in self.down:
            print(
                f"sluice: rollout actor {engine} died during {during}; the run goes on without "
                f"it until Ray has restarted it",
                file=sys.stderr,
                flush=True,
            )
        self._mark_down(engine)

    def _mark_down(self, engine: int) -> None:
        """`engine` takes no work until it is back, and the live engines drop its server."""
        self.down.add(engine)
        url = self.urls.pop(engine, None)
        if url is not None:
            self._drop_peer(url)

    def _drop_peer(self, url: str) -> None:
        """Every live engine sends `url` nothing more, from now on (mid-generation too)."""
        calls = {
            e: self.actors[e].drop_peer.options(concurrency_group=PEER_CALLS).remote(url)
            for e in self.live()
        }
        if not calls:
            return
        # Not deadline.get: a stuck engine's replacement calls this after its phase's bound.
        ready, late = ray.wait(list(calls.values()), num_returns=len(calls), timeout=PEER_DROP_S)
        # Ray does not order a call of the 'peers' group after one of the default group: a
        # drop still out when `connect_peers` runs could land after it and undo a rejoin.
        self.late_drops.extend(late)
        for e, ref in calls.items():
            if ref in ready:
                try:
                    ray.get(ref)
                except RayActorError:
                    self.went_down(e, "dropping a peer that went down")

    def dead_members(self, members: list[int], probe_s: float = DEATH_PROBE_S) -> list[int]:
        """Of the engines `members`, those whose process has died (marked down); see
        `dead_actors`."""
        dead = [members[i] for i in dead_actors([self.actors[e] for e in members], probe_s)]
        for e in dead:
            self.went_down(e, "the weight update")
        return dead

    def generate(self, prompts: list[PromptRecord], step: int) -> list[RolloutResult]:
        """Sample every prompt's group; each engine gets whole groups, results stay in the store.

        Engine e samples step s with seed (run seed, s, e), never with a carried-over RNG state."""
        return self.collect(self.start_generate(prompts, step))

    def start_generate(
        self, prompts: list[PromptRecord], step: int, round_: int = 0
    ) -> list[EngineCall]:
        """`generate` without waiting: one call per live engine, to pass to `collect`.
        `round_`: a refill round of dynamic sampling (its own seeds)."""
        calls = []
        engines = self._live_or_rejoined()
        for e, share in zip(engines, split_evenly(prompts, len(engines)), strict=True):
            key = (self.config.seed, step, e) + ((round_,) if round_ else ())
            seed = hash(key) & 0x7FFFFFFF
            if share:  # (a refill round may have fewer groups than engines)
                calls.append(self._call(e, "generate", (share, self._next_group_id, seed)))
            self._next_group_id += len(share)
        return calls

    def collect(self, calls: list[EngineCall], cancelled_ok: bool = False) -> list[Any]:
        """The results of `calls`, in order; a share whose engine died is re-issued. With
        `cancelled_ok`, a call cancelled by `ray.cancel` gives None."""
        results = []
        for call in calls:
            while True:
                try:
                    results.append(deadline.get(call.ref))
                    break
                except (RayActorError, EngineNeedsWeights) as error:
                    call = self._reissue(call, error)
                except deadline.PhaseTimeout as stuck:
                    call = self._replace_stuck(call, stuck)
                except (TaskCancelledError, GenerationAborted):
                    if not cancelled_ok:
                        raise
                    results.append(None)
                    break
        return results

    def again(self, call: EngineCall) -> EngineCall:
        """`call` started again, on its engine if that is live."""
        live = self._live_or_rejoined()
        engine = call.engine if call.engine in live else live[call.engine % len(live)]
        return self._call(engine, call.method, call.args)

    def _reissue(self, call: EngineCall, error: Exception) -> EngineCall:
        self._mark_down(call.engine)
        live = self._live_or_rejoined(error)
        target = live[call.engine % len(live)]
        cause = {EngineNeedsWeights: "was restarted", deadline.PhaseTimeout: "was stuck"}
        cause = cause.get(type(error), "died")
        print(
            f"sluice: rollout actor {call.engine} {cause} during {call.method}; its "
            f"{len(call.args[0])} prompt group(s) go to engine {target}",
            file=sys.stderr,
            flush=True,
        )
        self.reissued_groups += len(call.args[0])
        return self._call(target, call.method, call.args)

    def _replace_stuck(self, call: EngineCall, stuck: deadline.PhaseTimeout) -> EngineCall:
        """`call` outlived its phase's bound: its engine is wedged (a hung kernel, a reward
        that never returns). Kill it (Ray restarts it, `rollout.max_restarts`) and give its
        share to a live engine with the phase's whole bound; raise `stuck` only when no
        engine is left to take it. (The stacks are already written, see `deadline`.)"""
        print(f"sluice: {stuck}; killing rollout actor {call.engine}", file=sys.stderr, flush=True)
        ray.kill(self.actors[call.engine], no_restart=False)
        self.went_down(call.engine, call.method)
        deadline.renew()
        try:
            return self._reissue(call, stuck)
        except RuntimeError as lost:  # every engine is gone for good
            raise deadline.PhaseTimeout(f"{stuck}; {lost}", stuck.stuck_actor_ids) from None

    def _live_or_rejoined(self, error: Exception | None = None) -> list[int]:
        """The live engines; if none is, wait for Ray's restarts and the driver's sync."""
        if not self.live():
            if self.rejoin is None:
                raise error or RuntimeError("every rollout actor is down")
            print("sluice: every engine is down; waiting for their restarts", file=sys.stderr)
            self.rejoin()
        return self.live()

    def _call(self, engine: int, method: str, args: tuple) -> EngineCall:
        ref = getattr(self.actors[engine], method).remote(*args)
        return EngineCall(engine, method, args, ref)

    @property
    def next_group_id(self) -> int:
        return self._next_group_id

    @next_group_id.setter
    def next_group_id(self, value: int) -> None:
        self._next_group_id = value

    def evaluate(self, prompts: list[PromptRecord], settings: EvalConfig) -> list[EvalCounts]:
        return self.collect(self.start_evaluate(prompts, settings))

    def start_evaluate(self, prompts: list[PromptRecord], settings: EvalConfig) -> list[EngineCall]:
        """The evaluation's calls, one share per live engine; `collect` gives their counts."""
        engines = self._live_or_rejoined()
        shares = zip(engines, split_evenly(prompts, len(engines)), strict=True)
        return [self._call(e, "evaluate", (s, settings)) for e, s in shares if s]

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
