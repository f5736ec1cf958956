"""RolloutActor: one inference engine, plus rewards and group advantages next to it.

Verbs (all called by the driver):
- `generate(groups, step)`: sample `samples_per_prompt` responses for each prompt, score them,
  compute GRPO advantages per group, and put Arrow record batches of whole groups into the
  object store. Returns references and small counts only.
- `evaluate(prompts)`: k answers to each held-out prompt (`eval`), scored; returns counts.
- weight updates (`init_weights_update_group`, `check_weights_update`,
  `update_weights_from_distributed`, `weight_checksums`), delegated to the engine.

Concurrency: the driver never calls `generate` and `update_weights_from_distributed` on one
actor at the same time (the actor runs its methods one at a time anyway), so an engine never
samples from half-loaded weights. The one exception is `drop_peer`, which runs in a concurrency
group of its own (PEER_CALLS) so that it reaches an engine in the middle of a generation; it
only touches the engine's thread-safe server list.

Restarts: when the actor's process dies, Ray starts it again in its bundle
(`rollout.max_restarts`). The new incarnation holds its checkpoint's weights, not the run's
current ones, so it refuses to generate (`EngineNeedsWeights`) until a weight update has
reached it; the driver sends its work to the live engines meanwhile (`RolloutGroup.collect`).
"""

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray
import torch

from actors import fault_points
from actors.device import actor_device
from config.schema import EvalConfig, SluiceConfig
from data.prompts import PromptRecord, encode_prompt
from data.schema import RolloutBatchRef, build_rollout_batch
from inference import create_engine
from inference.engine import Completion, GenerationAborted, SamplingParams
from models.checkpoint_format import checkpoint_tensors
from rl.evaluation import EvalCounts
from rl.grpo import group_advantages, rewards_differ
from rl.reward_pool import RewardScorer, Sample, Scores, failure_counts
from weights.manifest import Bucket
from weights.process_group import GroupInfo
from weights.sync import SyncStats

if TYPE_CHECKING:
    from inference.sglang.engine import EngineSite


class EngineNeedsWeights(RuntimeError):
    """A restarted rollout actor was asked to generate before it received the current weights."""


@dataclass
class RolloutStats:
    """Counts of one engine's share of a step; the driver sums them over engines."""

    samples: int = 0
    reward_sum: float = 0.0
    correct: int = 0
    response_tokens: int = 0
    prompt_tokens: int = 0
    truncated: int = 0
    generate_seconds: float = 0.0
    weight_versions: set[int] = field(default_factory=set)
    advantage_sum: float = 0.0
    advantage_square_sum: float = 0.0
    """Of the advantages as stored (for the step-wide normalization of REINFORCE++)."""
    groups: int = 0
    """Prompt groups in the batches (all of them unless dynamic sampling dropped some)."""
    filtered_groups: int = 0
    """Prompt groups dropped by dynamic sampling (all their rewards equal)."""
    scored: int = 0
    scored_reward_sum: float = 0.0
    scored_correct: int = 0
    """Of every sample scored, dropped groups' too: the policy's reward, unfiltered."""
    reward_timeouts: int = 0
    """Samples scored 0.0 because their reward call outlasted rollout.reward_timeout_s."""
    reward_crashes: int = 0
    """Samples scored 0.0 because their reward worker process died while scoring them."""
    episodes: int = 0
    """Multi-turn episodes (rollout.environment); the counts below are theirs."""
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0
    observation_tokens: int = 0
    """Tokens the environments added between model turns (loss mask 0)."""
    model_tokens: int = 0
    """The episodes' trained tokens (the model's own, loss mask 1)."""
    episode_ends: dict[str, int] = field(default_factory=dict)
    """Episodes ended by a limit, by the limit's name (`max_turns`, `max_tokens`, ...)."""

    def add_episode(self, outcome) -> None:
        counts = outcome.counts
        self.episodes += 1
        self.turns += counts.turns
        self.tool_calls += counts.tool_calls
        self.tool_errors += counts.tool_errors
        self.tool_seconds += counts.tool_seconds
        self.observation_tokens += counts.observation_tokens
        self.model_tokens += sum(outcome.completion.loss_mask)
        if outcome.end_reason is not None:
            self.episode_ends[outcome.end_reason] = self.episode_ends.get(outcome.end_reason, 0) + 1


@dataclass
class RolloutResult:
    batches: list[RolloutBatchRef]
    stats: RolloutStats


CORRECT_REWARD = 1.0
"""A sample counts as correct (accuracy) when its reward reaches this value."""

PEER_CALLS = "peers"
"""The concurrency group `drop_peer` is called in: a call in the default group would wait for
the running generation to end."""

CONCURRENCY_GROUPS = {PEER_CALLS: 1}
"""What `ray.remote` declares for a RolloutActor (the driver calls `drop_peer` in PEER_CALLS)."""


class RolloutActor:
    def __init__(self, config: SluiceConfig, engine_index: int, site: "EngineSite | None" = None):
        fault_points.reached("rollout", engine_index, "start")
        self.config = config
        self.engine_index = engine_index
        self.device = actor_device()
        # Imported here, not at the top: the driver imports this module for the class alone,
        # and transformers' model code takes seconds to import that only the actor needs.
        from models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(config.model)
        self.engine = create_engine(config, self.device, engine_index, site)
        r = config.rollout
        self.episodes = self.rewards = None  # multi-turn episodes score themselves
        if r.environment is not None or r.agent is not None:
            # A named point mid-episode (every turn after the first engine call), for drills.
            def before_turn():
                fault_points.reached("rollout", engine_index, "episode_turn")

            self.episodes = _episode_runner(
                r, self.engine, self.tokenizer, before_turn, engine_index, config.data
            )
        else:
            self.rewards = RewardScorer(r.reward, r.reward_workers, r.reward_timeout_s)
        # `ray.cancel` on a running call only raises a flag (the actor keeps its state); the
        # engine polls it between decoding steps, the rewards while the actor waits for them.
        context = ray.get_runtime_context()
        in_actor = context.get_actor_id() is not None  # (not when built directly, in tests)
        self.cancelled = context.is_canceled if in_actor else lambda: False
        self.engine.should_stop = self.cancelled
        with warnings.catch_warnings():  # the property reads Ray's own deprecated actor_id
            warnings.simplefilter("ignore")
            self.restarted = in_actor and context.was_current_actor_reconstructed
        """Ray restarted this actor after its process died, and no weight update came since."""
        if self.restarted:
            print(
                f"[rollout actor {engine_index}] restarted after its process died; it generates "
                f"again once the driver has sent it the current weights",
                flush=True,
            )

    def _check_current_weights(self) -> None:
        if self.restarted:
            raise EngineNeedsWeights(
                f"rollout actor {self.engine_index} was restarted and has not received the "
                f"current weights yet"
            )

    def generate(
        self, groups: list[PromptRecord], group_id_start: int, sampling_seed: int
    ) -> RolloutResult:
        """Sample every group; `sampling_seed` (distinct per step and engine) makes a step's
        samples depend only on the weights and the seed, so a resumed run repeats them."""
        fault_points.reached("rollout", self.engine_index, "generate")
        self._check_current_weights()
        r = self.config.rollout
        torch.manual_seed(sampling_seed)
        params = SamplingParams(
            r.max_new_tokens, r.temperature, r.top_p, r.top_k, seed=sampling_seed
        )
        repeated = [ids for ids in self._encode(groups) for _ in range(r.samples_per_prompt)]
        start = time.perf_counter()
        if self.episodes is not None:
            records = [g for g in groups for _ in range(r.samples_per_prompt)]
            outcomes = self.episodes.run(records, repeated, params)
            repeated = [outcome.prompt_ids for outcome in outcomes]  # (an agent's own prompt)
            stats = RolloutStats(generate_seconds=time.perf_counter() - start)
            for outcome in outcomes:
                stats.add_episode(outcome)
            completions = [outcome.completion for outcome in outcomes]
            rewards = [outcome.reward for outcome in outcomes]
        else:
            scores = self._scores(groups, r.samples_per_prompt)
            completions = self._generate(repeated, params, scores)
            stats = RolloutStats(generate_seconds=time.perf_counter() - start)
            self._check_not_cancelled()
            rewards = self._rewards(scores, completions, stats)
        self._check_not_cancelled()
        a = self.config.algorithm
        advantages = (
            group_advantages(
                torch.tensor(rewards).view(len(groups), r.samples_per_prompt),
                # REINFORCE++'s baseline: the group mean only; the driver normalizes the step.
                a.normalize_advantage_std and a.advantage == "group",
            )
            .view(-1)
            .tolist()
        )
        n = r.samples_per_prompt
        kept = list(range(len(groups)))
        if r.dynamic_sampling:  # DAPO: a group whose samples all scored alike teaches nothing
            kept = [g for g in kept if rewards_differ(rewards[g * n : (g + 1) * n])]
        stats.groups, stats.filtered_groups = len(kept), len(groups) - len(kept)
        stats.scored, stats.scored_reward_sum = len(rewards), float(sum(rewards))
        stats.scored_correct = sum(reward >= CORRECT_REWARD for reward in rewards)
        batches = []
        for first in range(0, len(kept), r.groups_per_batch):
            rows = [g * n + k for g in kept[first : first + r.groups_per_batch] for k in range(n)]
            batches.append(
                self._put_batch(
                    rows, repeated, completions, rewards, advantages, group_id_start, stats
                )
            )
        return RolloutResult(batches, stats)

    def _check_not_cancelled(self) -> None:
        if self.cancelled():
            raise GenerationAborted(f"rollout actor {self.engine_index}: generation cancelled")

    def _encode(self, records: list[PromptRecord]) -> list[list[int]]:
        data = self.config.data
        return [
            encode_prompt(
                self.tokenizer, r.prompt, data.apply_chat_template, data.chat_template_kwargs
            )
            for r in records
        ]

    def _scores(self, records: list[PromptRecord], n: int) -> Scores:
        """The rewards of a generation in which completion i answers record i // n."""

        def sample_of(i: int, completion: Completion) -> Sample:
            record = records[i // n]
            response = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            return Sample(record.text, response, record.label)

        return self.rewards.batch(sample_of)

    def _generate(self, prompts: list[list[int]], params, scores: Scores) -> list[Completion]:
        """The engine's completions, each queued for its reward as soon as it is final."""
        try:
            return self.engine.generate(prompts, params, scores.add)
        except BaseException:
            scores.cancel()  # (what an engine reported before it failed is not scored)
            raise

    def _rewards(
        self, scores: Scores, completions: list[Completion], stats: RolloutStats | None = None
    ) -> list[float]:
        """Each completion's reward, once all are scored; raises GenerationAborted once the
        call is cancelled. Rewards that timed out or lost their worker (0.0) are counted in
        `stats` and told in one line on stderr."""
        scored = scores.collect(completions, self.cancelled)
        if scored is None:  # cancelled while it waited
            raise GenerationAborted(f"rollout actor {self.engine_index}: generation cancelled")
        timeouts, crashes = failure_counts(scored)
        if stats is not None:
            stats.reward_timeouts, stats.reward_crashes = timeouts, crashes
        if timeouts or crashes:
            self._tell_reward_failures(len(scored), timeouts, crashes)
        return [score.reward for score in scored]

    def _tell_reward_failures(self, samples: int, timeouts: int, crashes: int) -> None:
        print(
            f"[rollout actor {self.engine_index}] reward function {self.rewards.path}: "
            f"{timeouts + crashes} of {samples} samples scored 0.0 without an answer: "
            f"{timeouts} took longer than rollout.reward_timeout_s="
            f"{self.rewards.timeout_s:g} s, {crashes} ended their worker process",
            file=sys.stderr,
            flush=True,
        )

    def _put_batch(
        self, rows, prompts, completions, rewards, advantages, group_id_start, stats
    ) -> RolloutBatchRef:
        n = self.config.rollout.samples_per_prompt
        versions = self._weight_versions([completions[i] for i in rows])
        columns = {
            "prompt_ids": [prompts[i] for i in rows],
            "response_ids": [completions[i].token_ids for i in rows],
            "rollout_log_probs": [completions[i].log_probs for i in rows],
            "loss_mask": [_loss_mask(completions[i]) for i in rows],
            "turn_starts": [completions[i].turn_starts or [0] for i in rows],
            "reward": [rewards[i] for i in rows],
            "advantage": [advantages[i] for i in rows],
            "group_id": [group_id_start + i // n for i in rows],
            "sample_index": [i % n for i in rows],
            "weight_version": versions,
            "finish_reason": [completions[i].finish_reason for i in rows],
        }
        if self.config.algorithm.routing_replay:
            columns["routed_experts"] = [completions[i].routed_experts for i in rows]
        prompt_tokens = sum(len(prompts[i]) for i in rows)
        response_tokens = sum(len(completions[i].token_ids) for i in rows)
        loss_tokens = sum(sum(columns["loss_mask"][j]) for j in range(len(rows)))
        stats.samples += len(rows)
        stats.reward_sum += sum(rewards[i] for i in rows)
        stats.correct += sum(rewards[i] >= CORRECT_REWARD for i in rows)
        stats.prompt_tokens += prompt_tokens
        stats.response_tokens += response_tokens
        stats.truncated += sum(completions[i].finish_reason == "length" for i in rows)
        stats.weight_versions.update(versions)
        stats.advantage_sum += sum(advantages[i] for i in rows)
        stats.advantage_square_sum += sum(advantages[i] ** 2 for i in rows)
        return RolloutBatchRef(
            ref=ray.put(build_rollout_batch(columns)),
            num_samples=len(rows),
            num_tokens=prompt_tokens + response_tokens,
            num_loss_tokens=loss_tokens,
        )

    def _weight_versions(self, completions: list[Completion]) -> list[int]:
        """Each sample's weight version: the one its server reported (an SGLang reply may come
        from another engine's server), else this engine's."""
        own = self.engine.weight_version
        return [own if c.weight_version is None else c.weight_version for c in completions]

    def evaluate(self, prompts: list[PromptRecord], settings: EvalConfig) -> EvalCounts:
        """settings.samples_per_prompt answers to each held-out prompt, in one engine call
        with the settings' length, temperature and top-p; scored, returned as counts only."""
        self._check_current_weights()
        k = settings.samples_per_prompt
        repeated = [ids for ids in self._encode(prompts) for _ in range(k)]
        if self.episodes is not None:
            records = [p for p in prompts for _ in range(k)]
            outcomes = self.episodes.run(records, repeated, self._eval_params(settings))
            completions = [outcome.completion for outcome in outcomes]
            rewards = [outcome.reward for outcome in outcomes]
        else:
            scores = self._scores(prompts, k)
            completions = self._generate(repeated, self._eval_params(settings), scores)
            rewards = self._rewards(scores, completions)
        lengths = [len(completion.token_ids) for completion in completions]
        return EvalCounts.of(rewards, lengths, k, CORRECT_REWARD)

    def _eval_params(self, e: EvalConfig) -> SamplingParams:
        """The settings `e`; each one left unset takes the rollout's (top-k always does)."""
        r = self.config.rollout
        return SamplingParams(
            e.max_new_tokens or r.max_new_tokens,
            r.temperature if e.temperature is None else e.temperature,
            r.top_p if e.top_p is None else e.top_p,
            r.top_k,
            greedy=e.greedy(),
        )

    # Serving engines (SGLang): peers to balance over, restarts, memory around training.

    def url(self) -> str | None:
        return self.engine.url

    def connect_peers(self, urls: list[str]) -> None:
        self.engine.connect_peers(urls)

    def drop_peer(self, url: str) -> None:
        """Another engine went down: send its server nothing more. Called in PEER_CALLS, so
        it may run while `generate` runs."""
        self.engine.drop_peer(url)

    def ensure_running(self) -> bool:
        """True if the engine (or this whole actor) was restarted and needs the weight group
        rebuilt and a sync before it generates."""
        return self.engine.ensure_running() or self.restarted

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self, regions: tuple[str, ...]) -> None:
        self.engine.resume_memory(regions)

    # Weight updates (SGLang's verbs), delegated to the engine.

    def weight_ranks(self) -> int:
        return self.engine.weight_ranks

    def destroy_weights_update_group(self) -> None:
        self.engine.destroy_weights_update_group()

    def init_weights_update_group(self, info: GroupInfo, rank_offset: int) -> None:
        self.engine.init_weights_update_group(info, rank_offset)

    def check_weights_update(self, plan: list[Bucket]) -> None:
        self.engine.check_weights_update(plan)

    def update_weights_from_distributed(self, plan: list[Bucket], version: int) -> SyncStats:
        fault_points.reached("rollout", self.engine_index, "update_weights")
        stats = self.engine.update_weights_from_distributed(plan, version)
        self.restarted = False
        return stats

    def update_weights_from_tensor(self, handles: list[str], version: int | None) -> None:
        self.engine.update_weights_from_tensor(handles, version)

    def finish_weight_update(self, version: int) -> None:
        self.engine.finish_weight_update(version)
        self.restarted = False

    def weight_version(self) -> int:
        return self.engine.weight_version

    def weight_checksums(self) -> dict[str, str]:
        return self.engine.weight_checksums()

    def named_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of every engine weight (tests compare them with the trainer's)."""
        return {n: p.detach().cpu().clone() for n, p in checkpoint_tensors(self.engine.model)}

    def shutdown(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        if self.episodes is not None:
            self.episodes.close()
        self.engine.shutdown()


def _loss_mask(completion: Completion) -> list[int]:
    """A multi-turn episode's mask (its observation tokens 0), else every token counts."""
    if completion.loss_mask is not None:
        return list(completion.loss_mask)
    return [1] * len(completion.token_ids)


def _episode_runner(r, engine, tokenizer, before_turn, engine_index, data):
    """The runner of rollout.environment's (or rollout.agent's) episodes, with its tools'
    pool."""
    from rl.environments import Limits
    from rl.episodes import EpisodeRunner

    tools = None
    if r.tools:
        from rl.tools import ToolPool

        tools = ToolPool(
            r.tools,
            workers=r.tool_workers,
            timeout_s=r.tool_timeout_s,
            memory_mb=r.tool_memory_mb,
            # Its own tool actor: one that dies with this actor costs no other's calls, and a
            # restarted incarnation (a new pid) never finds its predecessor's dying one by name.
            namespace_key=f"sluice-rollout{engine_index}-pid{os.getpid()}",
        )
    limits = Limits(r.max_turns, r.max_episode_tokens, r.max_tool_calls, r.max_new_tokens)
    path, environment = r.environment, None
    if r.agent is not None:
        from rl.agent_endpoint import AgentEnvironment

        path, environment = r.agent, AgentEnvironment(r.agent, data.chat_template_kwargs)
    return EpisodeRunner(
        path,
        engine,
        tokenizer,
        limits,
        tools,
        before_turn,
        environment,
        chat_template_kwargs=data.chat_template_kwargs,
    )
