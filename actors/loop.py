"""The driver loop: `Driver` owns the actor groups of one run and steps them.

One step (what waits for what): the engines generate whole prompt groups and put Arrow
batches into the object store; the driver splits the references across the training ranks
by tokens (it never holds rows); every rank takes one optimizer step; then the leader rank
broadcasts the new weights to every engine, which must report the new version before the
next step's generation starts. With `algorithm.max_staleness` 1 the next step's generation
runs on the engines while a step trains, and is finished (or aborted) before the weight
update (`actors/rollout_queue.py`).

Faults: a rollout actor that dies or wedges is restarted by Ray and its work goes to the live
engines (`RolloutGroup`), the weight update going on without it (`WeightSync`); a training
actor that dies makes the driver replace the whole training group and resume from the last
checkpoint, the engines staying up (`checkpoint.max_restarts`).
"""

import json
import os
import sys
import time
from pathlib import Path

import ray
from ray.exceptions import RayError
from tqdm import tqdm

from actors import deadline
from actors.groups import EngineCall, RolloutGroup, TrainGroup
from actors.preflight import LOOP_STATE_FILE, check_hardware, check_run, local_use_gpus
from actors.rollout_queue import RolloutQueue
from actors.runtime import connect_ray
from actors.stopping import StopRequest
from actors.weight_sync import WeightSync
from config import SluiceConfig
from config.loader import to_dict
from data.balance import balance_by_tokens
from data.prompts import PromptStream
from inference.engine import CACHE_MEMORY, WEIGHT_MEMORY
from placement.cluster import read_cluster_shape
from placement.groups import create_placement
from placement.multinode import apply_cpu_adam_rule, check_paths_on_nodes
from placement.planner import plan_layout
from rl.evaluation import EvalCounts, set_metrics
from rl.grpo import batch_shift_scale
from tracking.backends import make_backends
from tracking.metrics import MetricsWriter, start_line, step_line
from tracking.ray_metrics import RayMetrics
from training.backend import TrainStats
from weights.sync import SyncStats

SHUTDOWN_TIMEOUT_S = 60.0
STUCK_SHUTDOWN_TIMEOUT_S = 10.0
"""After a phase timed out: enough for the idle actors (SGLang servers stop with them)."""


class Driver:
    """Owns the actor groups of one run and steps them. Build it from a validated config."""

    def __init__(
        self,
        config: SluiceConfig,
        ray_address: str | None = None,
        stop: StopRequest | None = None,
    ):
        """`stop`: SIGINT / SIGTERM handling for a run from the command line (`driver.main`);
        without it, signals keep their defaults (a Python caller owns them)."""
        self.created = time.perf_counter()  # summary.json's wall_seconds counts start-up too
        self.stop = stop
        self.config = config
        # Every input and setting, checked before Ray and any actor start (actors/preflight.py).
        inputs = check_run(config)
        if not (ray_address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
            check_hardware(config, local_use_gpus(config), config.placement.colocate)
        if inputs.fp8 is not None:
            fp8, loss = inputs.fp8, inputs.loss
            tis = f"TIS on (cap {loss.tis_cap:g})" if loss.tis else "TIS off"
            print(
                f"[sluice] fp8 rollouts: weights quantized to e4m3 in {fp8.block_size[0]}x"
                f"{fp8.block_size[1]} blocks at every sync ({fp8.source}); {tis}; ratio "
                f"denominator: {loss.old_log_probs} log-probs",
                flush=True,
            )
        start_from = inputs.start_from
        self.eval_sets = inputs.eval_sets
        self.evaluation: tuple[int, dict[str, list[EngineCall]], bool] | None = None
        """An evaluation started and not yet collected (eval.overlap_training): the step
        after which it started, each set's engine calls, and whether to print its line."""
        self.last_eval: dict[str, float] | None = None
        if notice := config.eval.replaced_default(config.data):
            print(f"note: {notice}", flush=True)
        self.prompts = PromptStream(inputs.train, config.seed, config.data.shuffle)
        self.output_dir = Path(config.logging.output_dir)
        print(start_line(config), flush=True)
        connect_ray(ray_address)
        if stop is not None:
            stop.install()  # after ray.init, whose own SIGTERM handler exits at once
        self.layout = plan_layout(read_cluster_shape(), config)
        if notice := apply_cpu_adam_rule(config, self.layout):
            print(f"note: {notice}", flush=True)
        check_paths_on_nodes(config, self.layout)  # every node sees the model, data, checkpoints
        check_hardware(config, self.layout.use_gpus, self.layout.colocate)
        self.placement = create_placement(self.layout)
        try:
            if self.layout.colocate:
                # The trainers take their memory first, so engines sharing their GPUs size
                # their KV cache (a fraction of the GPU, --mem-fraction-static) against what
                # is really left, instead of holding it before the trainers exist.
                self.trainers = TrainGroup(config, self.placement)
                self.engines = RolloutGroup(config, self.placement)
            else:
                # On their own GPUs the engines load while the trainers start (TrainGroup
                # waits for its ranks); start-up costs the slower of the two, not their sum.
                self.engines = RolloutGroup(config, self.placement)
                self.trainers = TrainGroup(config, self.placement)
            self.engines.connect_peers()  # waits for the engines to finish starting
            self.weights = WeightSync(
                config.weight_sync, self.trainers, self.engines, self.layout, config.rollout.engine
            )
            self.weights.setup()
            self.version = 0
            self.steps_done = 0
            self.trainer_restarts = 0
            self.rollouts = RolloutQueue(
                self.engines,
                self.prompts,
                config.rollout.prompts_per_step,
                config.algorithm.max_staleness,
                config.num_steps,
                config.rollout.partial,
                refill_rounds=config.rollout.dynamic_sampling_max_rounds
                if config.rollout.dynamic_sampling
                else 0,
            )
            self.start_from = start_from
            self.last_checkpoint = start_from  # where a restart goes back to (see _save)
            self.start_state = self._loop_state()  # where a lost training group goes back to
            if start_from is not None:
                self._load(start_from)
            self.engines.rejoin = self._rejoin_engines
            # Engines start from exactly the trainer's weights (loaded or initial).
            self.weights.sync(version=self.version)
        except BaseException:
            self.placement.remove()  # frees the bundles and kills the actors already made
            raise
        # Nothing is written into the output folder before the first metrics (tracking/run_dir).
        config_text = json.dumps(to_dict(config), indent=2)
        self.metrics = MetricsWriter(
            self.output_dir,
            config_text,
            replace=config.logging.overwrite and not inputs.resuming,
            resume_step=self.steps_done if inputs.resuming else None,
            backends=make_backends(config.logging, self.output_dir, config_text),
        )
        self.ray_metrics = RayMetrics(run=str(self.output_dir))  # the dashboard's Metrics page

    def step(self) -> dict[str, float]:
        """One RL step: rollout, train, weight sync. Returns the step's metrics.

        If a training actor dies, the training group restarts from the last checkpoint and
        this returns the metrics of the first step after it."""
        while True:
            try:
                return self._step()
            except Exception as error:
                self._restart_trainers_if_dead(error)

    def _step(self) -> dict[str, float]:
        c = self.config
        step = self.steps_done + 1
        start = time.perf_counter()
        with self._phase("rollout", step):
            results = self.rollouts.results_for(step)
        rollout_done = time.perf_counter()
        results, lag, dropped = self._within_staleness(results)
        batches = [b for r in results for b in r.batches]
        shares = balance_by_tokens(batches, self.trainers.data_parallel_size)
        if c.algorithm.loss_aggregation == "token_mean":
            normalizer = sum(b.num_loss_tokens for b in batches)
        else:
            normalizer = sum(b.num_samples for b in batches)
        train_stats, sync = [], SyncStats(self.version, 0, 0.0, 0)
        train_done = ahead_done = time.perf_counter()
        if batches:
            with self._phase("train", step):
                if self.layout.colocate:  # colocated engines give the trainers their memory
                    self.engines.release_memory()
                advantage_norm = self._advantage_norm(results)
                train_stats = self.trainers.train(shares, normalizer, advantage_norm)
            train_done = time.perf_counter()
            self.version += 1
            self.collect_evaluation()  # it scores the weights it started on: before the update
            with self._phase("rollout", step):  # what runs ahead finishes or aborts first
                self.rollouts.before_weight_update()
            ahead_done = time.perf_counter()
            with self._phase("sync", step):
                if self.engines.check_engines(self.weights.members):  # restarted, back, gone
                    self.weights.rebuild(self.engines.live())
                sync = self._sync_weights()
            self.rollouts.after_weight_update()
        else:  # dynamic sampling found no group with a learning signal: nothing to train on
            print(f"sluice: step {step} has no sample to train on; weights unchanged", flush=True)
        end = time.perf_counter()
        self.steps_done += 1
        metrics = {
            **rollout_metrics(results, rollout_done - start),
            **TrainStats.reduce(train_stats),
            "time/rollout": rollout_done - start,
            "time/train": train_done - rollout_done,
            "time/rollout_ahead_wait": ahead_done - train_done,
            "time/sync": end - ahead_done,
            "time/step": end - start,
            "sync/gb_per_s": sync.gb_per_s if sync.nbytes else 0.0,
            "sync/bytes": sync.nbytes,
            "weight_version": self.version,
            "async/version_lag": lag,
            "async/dropped_samples": dropped,
            "async/aborted_groups": self.rollouts.aborted_groups,
            "rollout/sampling_rounds": self.rollouts.sampling_rounds,
            "fault/engine_restarts": self.engines.restarts,
            "fault/reissued_groups": self.engines.reissued_groups,
            "fault/trainer_restarts": self.trainer_restarts,
        }
        metrics["perf/tokens_per_s"] = metrics["rollout/tokens"] / metrics["time/step"]
        self.metrics.write(self.steps_done, metrics)
        self.ray_metrics.record(metrics, step=self.steps_done)
        return metrics

    def _advantage_norm(self, results: list) -> tuple[float, float] | None:
        """REINFORCE++ with a baseline: the (shift, scale) normalizing the step's advantages
        (group-centred by the engines) to mean 0 and std 1 over every trained sample."""
        if self.config.algorithm.advantage != "reinforce_plus_plus_baseline":
            return None
        return batch_shift_scale(
            sum(r.stats.samples for r in results),
            sum(r.stats.advantage_sum for r in results),
            sum(r.stats.advantage_square_sum for r in results),
        )

    def _within_staleness(self, results: list) -> tuple[list, int, int]:
        """The results within `algorithm.max_staleness` versions of the trainer's weights, the
        largest lag among them, and how many samples were dropped for exceeding it."""
        bound = self.config.algorithm.max_staleness
        kept, lag, dropped = [], 0, 0
        for result in results:
            result_lag = self.version - min(result.stats.weight_versions, default=self.version)
            if result_lag > bound:
                dropped += result.stats.samples
            else:
                kept.append(result)
                lag = max(lag, result_lag)
        if not kept:
            raise RuntimeError(
                f"every rollout of step {self.steps_done + 1} is more than "
                f"algorithm.max_staleness={bound} versions old"
            )
        return kept, lag, dropped

    def _restart_trainers_if_dead(self, error: Exception) -> None:
        """Re-raise `error` unless a training actor died; else replace the training group by
        new actors in the same bundles and go back to the last checkpoint this run saved, or
        the one it started from (the run's start without one): model, optimizer, step, data
        position, weight version, queued rollouts. The engines stay up; they are sent the
        checkpoint's weights."""
        c = self.config
        dead = self.trainers.dead_ranks() if isinstance(error, RayError) else []
        if not dead:
            raise error
        if self.trainer_restarts >= c.checkpoint.max_restarts:
            raise RuntimeError(
                f"training rank(s) {dead} died and the training group was restarted "
                f"{self.trainer_restarts} time(s) already (checkpoint.max_restarts="
                f"{c.checkpoint.max_restarts})"
            ) from error
        self.trainer_restarts += 1
        # Never `latest(checkpoint.save)`: another run may have written a newer one there, or
        # this run resumed from an older step than the save root's latest.
        source = self.last_checkpoint
        print(
            f"sluice: training rank(s) {dead} died during step {self.steps_done + 1}; restarting "
            f"the training group ({self.trainer_restarts}/{c.checkpoint.max_restarts}) from "
            f"{source or 'the start of the run'}",
            file=sys.stderr,
            flush=True,
        )
        with self._phase("train", self.steps_done + 1):
            # The engines finish what they generate; it is discarded (the checkpoint's own
            # queued rollouts come back with it).
            self.rollouts.discard(next_step=self.start_state["steps_done"] + 1)
            self.trainers.kill()  # returns once their processes are gone (GPU memory freed)
            self.trainers = TrainGroup(c, self.placement, incarnation=self.trainer_restarts)
            self.weights.rebuild(self.engines.live(), trainers=self.trainers)
            self._set_loop_state(self.start_state)
            if source is not None:
                self._load(source)
            self.metrics.rewind(self.steps_done)
            self._sync_weights()

    def _rejoin_engines(self) -> None:
        """Every engine is down: wait for Ray's restarts, then rebuild the weight group and
        send the current weights (the trainers are idle while the driver waits for rollouts)."""
        self.engines.wait_until_all_up()
        self.weights.rebuild(self.engines.live())
        self._sync_weights()

    def _phase(self, name: str, step: int):
        """Bound every actor call of phase `name` by `timeouts.<name>_s` (actors/deadline.py)."""
        timeout_s = getattr(self.config.timeouts, f"{name}_s")
        return deadline.phase(name, step, timeout_s, self.output_dir)

    def _sync_weights(self) -> SyncStats:
        """The new version into every engine. Colocated, the engines take back their weights'
        memory first and their KV cache and CUDA graphs only after the update, so the
        trainers' export buffers have the room the cache would hold (slime's order)."""
        if self.layout.colocate:
            self.engines.resume_memory(WEIGHT_MEMORY)
        sync = self.weights.sync(self.version)
        if self.layout.colocate:
            self.engines.resume_memory(CACHE_MEMORY)
        return sync

    # Checkpoints: the trainers write the model and optimizer (torch_dist, or the torch
    # backend's torch_state.pt); the driver adds the loop's own state and the rollouts queued
    # ahead, then switches the save root over (see training/megatron/checkpoint.py).

    def save(self) -> Path | None:
        """Save the full training state under `checkpoint.save`; returns the checkpoint dir,
        or None if a training actor died meanwhile (the run went back to the last one)."""
        try:
            return self._save()
        except Exception as error:
            self._restart_trainers_if_dead(error)
            return None

    def _save(self) -> Path:
        from training.megatron.checkpoint import commit, staging_dir

        root = Path(self.config.checkpoint.save)
        staging = staging_dir(root, self.steps_done)
        with self._phase("save", self.steps_done):
            self.trainers.save_checkpoint(str(staging.resolve()))
        (staging / LOOP_STATE_FILE).write_text(json.dumps(self._loop_state(), indent=2))
        self.rollouts.save(staging)
        self.last_checkpoint = commit(root, self.steps_done)
        self._delete_old_checkpoints(root)
        return self.last_checkpoint

    def _delete_old_checkpoints(self, root: Path) -> None:
        """`checkpoint.keep_last`: once the new checkpoint is the latest, delete older ones,
        never the one this run started from (training/megatron/checkpoint.py `prune`)."""
        from training.megatron.checkpoint import prune

        keep_last = self.config.checkpoint.keep_last
        if not keep_last:
            return
        deleted = prune(root, self.steps_done, keep_last, keep=self.start_from)
        if deleted:
            names = ", ".join(path.name for path in deleted)
            print(
                f"sluice: deleted checkpoint(s) {names} (checkpoint.keep_last={keep_last})",
                flush=True,
            )

    def _loop_state(self) -> dict:
        return {
            "steps_done": self.steps_done,
            "weight_version": self.version,
            "prompts": self.prompts.state_dict(),
            "next_group_id": self.engines.next_group_id,
        }

    def _set_loop_state(self, state: dict) -> None:
        self.steps_done = state["steps_done"]
        self.version = state["weight_version"]
        self.prompts.load_state_dict(state["prompts"])
        self.engines.next_group_id = state["next_group_id"]

    def _load(self, directory: Path) -> None:
        """Start from a checkpoint: resume a saved run, or take a converted model's weights."""
        state_file = directory / LOOP_STATE_FILE
        resuming = state_file.is_file()
        self.trainers.load_checkpoint(str(directory.resolve()), with_optimizer=resuming)
        if resuming:
            self._set_loop_state(json.loads(state_file.read_text()))
            self.rollouts.load(directory, next_step=self.steps_done + 1)

    def evaluate(self, announce: bool = False) -> dict[str, float] | None:
        """Each held-out set's metrics (rl/evaluation.py), plus the first set's avg@k and mean
        reward as eval/accuracy and eval/reward_mean (None when the run has no set).

        What waits: it runs between steps, after the weight sync (it scores the new weights)
        and before the next step's generation starts; an engine first ends a generation
        restarted after the sync (rollout.partial abort). Each set is one `evaluate` call per
        engine, and the next step waits for every set: the loop is held for the evaluation's
        own generation time (k x prompts samples at eval's length), bounded by
        timeouts.rollout_s like a step's generation. With eval.overlap_training the run's
        evaluations between steps only start here (`start_evaluation`) and are collected
        before the next weight update (`collect_evaluation`), the next step training
        meanwhile."""
        self.start_evaluation(announce)
        return self.collect_evaluation()

    def start_evaluation(self, announce: bool = True) -> None:
        """Hand every held-out set to the engines, without waiting (`collect_evaluation`);
        `announce`: print its accuracy line when collected (the run's evaluations after a
        step; not the one before the first)."""
        if not self.eval_sets:
            return
        self.collect_evaluation()  # one left from a step that updated no weights
        calls = {
            name: self.engines.start_evaluate(prompts, self.config.eval)
            for name, prompts in self.eval_sets.items()
        }
        self.evaluation = (self.steps_done, calls, announce)

    def collect_evaluation(self) -> dict[str, float] | None:
        """The started evaluation's metrics, written at the step after which it started
        (None when none was started); `last_eval` keeps them."""
        if self.evaluation is None:
            return None
        step, calls, announce = self.evaluation
        k = self.config.eval.samples_per_prompt
        metrics: dict[str, float] = {}
        with self._phase("rollout", step):  # evaluation is generation too
            for name, shares in calls.items():
                counts = sum(self.engines.collect(shares), EvalCounts())
                metrics |= set_metrics(name, k, counts)
        self.evaluation = None
        first = next(iter(self.eval_sets))
        metrics["eval/accuracy"] = metrics[f"eval/{first}/avg@{k}"]
        metrics["eval/reward_mean"] = metrics[f"eval/{first}/reward_mean"]
        self.metrics.write(step, metrics)
        self.ray_metrics.record(metrics)
        if announce:
            accuracy = metrics["eval/accuracy"]
            tqdm.write(f"eval after step {step}: accuracy {accuracy:.3f}", file=sys.stdout)
        self.last_eval = metrics
        return metrics

    def run(self) -> dict:
        """Run the remaining steps with evaluations; save the model; write summary.json."""
        c = self.config
        first = None if self.stopping else self.evaluate()  # a signal during start-up
        bar = tqdm(
            total=c.num_steps,
            initial=self.steps_done,
            # Not in a log file or `ray job logs`: its carriage returns would interleave with
            # the step lines, which carry the same progress.
            disable=not c.logging.progress_bar or not sys.stdout.isatty(),
            desc="sluice",
            unit="step",
            file=sys.stdout,
        )
        while self.steps_done < c.num_steps and not self.stopping:
            metrics = self.step()
            bar.n = self.steps_done  # not += 1: a restarted training group goes back
            bar.refresh()
            tqdm.write(step_line(self.steps_done, c.num_steps, metrics), file=sys.stdout)
            interval = c.checkpoint.save_interval
            if c.checkpoint.save and interval and self.steps_done % interval == 0:
                self.save()
            every = c.logging.eval_every
            if self.stopping:
                continue  # no evaluation either: stop as soon as the step is done
            if self.steps_done == c.num_steps:
                self.evaluate(announce=True)  # the run's result: waited for
            elif every and self.steps_done % every == 0:
                self.start_evaluation()
                if not c.eval.overlap_training:
                    self.collect_evaluation()
        # Only a stop leaves one started (the last step's is waited for): not waited for, the
        # run stops after its step as it would without it.
        self.evaluation = None
        bar.close()
        last = self.last_eval
        saved = _saved_at(c.checkpoint.save, self.steps_done) if c.checkpoint.save else True
        if not saved and self.steps_done:
            path = self.save()
            if path and self.stopping:
                print(f"sluice: saved {path}; --load it to resume", file=sys.stderr, flush=True)
        if c.logging.save_final_model and not self.stopping:
            self.trainers.save_hf(str((self.output_dir / "final_model").resolve()))
        summary = {
            "steps": self.steps_done,
            "first_eval_accuracy": first["eval/accuracy"] if first else None,
            "last_eval_accuracy": last["eval/accuracy"] if last else None,
            "weight_version": self.version,
            "wall_seconds": time.perf_counter() - self.created,
            "stopped_by": self.stop.signal.name if self.stopping else None,
            "engine_restarts": self.engines.restarts,
            "trainer_restarts": self.trainer_restarts,
        }
        self.metrics.begin()  # a run stopped before its first step has not taken it yet
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    @property
    def stopping(self) -> bool:
        """A stop signal arrived: no further step starts."""
        return self.stop is not None and self.stop.requested

    def close(
        self, shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S, stuck: frozenset[str] = frozenset()
    ) -> None:
        """Stop every actor, then release the placement groups. Never raises: a run that
        failed keeps its own error, and the actors are killed whatever their shutdown did.

        All shutdowns start together: closing one side of an NCCL weight group waits for the
        other side, so shutting the engines down before asking the trainers would hang. An
        actor stuck in a task never reaches its shutdown: those named in `stuck` (actor ids
        of a phase that timed out) are killed first, any other after the timeout.
        """
        self.metrics.close()
        actors = []
        for actor in self.engines.actors + self.trainers.actors:
            if actor._actor_id.hex() in stuck:  # (Ray has no public accessor for the id)
                ray.kill(actor)
            else:
                actors.append(actor)
        try:
            calls = [a.shutdown.remote() for a in actors]
            done, pending = [], []
            if calls:
                done, pending = ray.wait(calls, num_returns=len(calls), timeout=shutdown_timeout_s)
            failed = [ref for ref in done if _failed(ref)]
            if pending or failed:
                print(
                    f"sluice: {len(pending)} actor(s) did not shut down within "
                    f"{shutdown_timeout_s:g} s and {len(failed)} failed to; killed",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            for actor in actors:
                ray.kill(actor)
            self.placement.remove()

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if isinstance(exc, deadline.PhaseTimeout):
            self.close(STUCK_SHUTDOWN_TIMEOUT_S, stuck=exc.stuck_actor_ids)
        else:
            self.close(SHUTDOWN_TIMEOUT_S)


def _failed(ref: ray.ObjectRef) -> bool:
    try:
        ray.get(ref)
    except Exception:
        return True
    return False


def _saved_at(root: str, step: int) -> bool:
    from training.megatron.checkpoint import checkpoint_dir

    return checkpoint_dir(root, step).is_dir()


def rollout_metrics(results: list, seconds: float) -> dict[str, float]:
    """Reward and accuracy over every sample scored (with dynamic sampling, the dropped groups'
    too: the policy's own figures); lengths and tokens over the samples trained on."""
    samples = sum(r.stats.samples for r in results)
    trained = max(samples, 1)
    # (rollouts queued in a checkpoint of an older version have no `scored` counts)
    scored = sum(r.stats.scored or r.stats.samples for r in results)
    reward_sum = sum(r.stats.scored_reward_sum if r.stats.scored else r.stats.reward_sum
                     for r in results)  # fmt: skip
    correct = sum(r.stats.scored_correct if r.stats.scored else r.stats.correct for r in results)
    response_tokens = sum(r.stats.response_tokens for r in results)
    return episode_metrics(results) | {
        "rollout/samples": samples,
        "rollout/groups": sum(r.stats.groups for r in results),
        "rollout/filtered_groups": sum(r.stats.filtered_groups for r in results),
        "rollout/reward_timeouts": sum(r.stats.reward_timeouts for r in results),
        "rollout/reward_crashes": sum(r.stats.reward_crashes for r in results),
        "rollout/reward_mean": reward_sum / max(scored, 1),
        "rollout/accuracy": correct / max(scored, 1),
        "rollout/response_length_mean": response_tokens / trained,
        "rollout/truncated_fraction": sum(r.stats.truncated for r in results) / trained,
        "rollout/tokens": response_tokens + sum(r.stats.prompt_tokens for r in results),
        "rollout/generate_seconds": max(r.stats.generate_seconds for r in results),
        "rollout/tokens_per_s": response_tokens / seconds if seconds > 0 else 0.0,
        "rollout/weight_version": min(
            (v for r in results for v in r.stats.weight_versions), default=-1
        ),
    }


def episode_metrics(results: list) -> dict[str, float]:
    """Multi-turn episodes' figures (none without rollout.environment): per episode, turns,
    tool calls and errors, observation and model tokens; tool latency per call; limit ends by
    name."""
    episodes = sum(getattr(r.stats, "episodes", 0) for r in results)
    if not episodes:
        return {}
    calls = sum(r.stats.tool_calls for r in results)
    metrics = {
        "rollout/episodes": episodes,
        "rollout/turns_per_episode": sum(r.stats.turns for r in results) / episodes,
        "rollout/tool_calls_per_episode": calls / episodes,
        "rollout/tool_errors": sum(r.stats.tool_errors for r in results),
        "rollout/tool_seconds_mean": sum(r.stats.tool_seconds for r in results) / max(calls, 1),
        "rollout/observation_tokens_per_episode": sum(r.stats.observation_tokens for r in results)
        / episodes,
        "rollout/model_tokens_per_episode": sum(r.stats.model_tokens for r in results) / episodes,
    }
    for r in results:
        for reason, count in r.stats.episode_ends.items():
            key = f"rollout/episode_ends/{reason}"
            metrics[key] = metrics.get(key, 0) + count
    return metrics
