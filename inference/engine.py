"""The inference-engine interface a RolloutActor drives, and the registry of engine types.

The weight-update verbs mirror SGLang's HTTP endpoints (`/init_weights_update_group`,
`/update_weights_from_distributed`, ...) so that the SGLang engine and the in-process
transformers engine are interchangeable behind one RolloutActor.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from weights.manifest import Bucket
from weights.process_group import GroupInfo
from weights.sync import SyncStats


class GenerationAborted(RuntimeError):
    """The generation was stopped before it finished (`should_stop`: the driver cancelled the
    call, `rollout.partial: abort`); nothing it sampled is kept."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    """Argmax decoding (evaluation); temperature, top_p and top_k are then unused."""
    seed: int | None = None
    """The call's sampling seed (the rollout actor's step seed). An engine that takes a seed per
    request (SGLang) samples prompt i of a `generate` call with `request_seed(seed, i)`; None:
    the engine's own randomness."""


def request_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` of a call seeded `seed` (0 <= seed < 2**31): distinct for
    every (seed, index), and within SGLang's int64 `sampling_seed`."""
    return seed * 2**32 + index


@dataclass
class Completion:
    """One sampled response."""

    token_ids: list[int]
    log_probs: list[float]
    """Log-prob of each sampled token under the tempered, untruncated distribution (what the
    trainer recomputes), so the importance ratio is 1 when both sides hold the same weights."""
    finish_reason: str
    """`stop` (ended on EOS, which is included in token_ids) or `length`."""
    routed_experts: np.ndarray | None = None
    """With routing replay: the experts of every input position (prompt, then the response
    but its last token), [positions, moe_layers, top_k], uint8 (uint16 past 256 experts)."""
    weight_version: int | None = None
    """The weight version that generated it, where the server that answered says (SGLang's
    `meta_info.weight_version`: the client balances requests over every engine's server); None:
    the generating engine's own version (the transformers engine)."""
    loss_mask: list[int] | None = None
    """A multi-turn episode's (`rl/episodes.py`): 1 for the model's tokens, 0 for the
    observation tokens between its turns (their log-probs are 0.0). None: every token is the
    model's."""
    turn_starts: list[int] | None = None
    """A multi-turn episode's: where each model turn begins in token_ids. None: one turn."""


WEIGHT_MEMORY = ("weights",)
"""Resumed before a colocated weight update: the engine's weights, to be written over."""
CACHE_MEMORY = ("kv_cache", "cuda_graph")
"""Resumed after it: the KV cache and CUDA graphs would otherwise take the room the trainers'
export buffers use during the update (SGLang's region names)."""


OnCompletion = Callable[[int, Completion], None]
"""`on_completion(i, completion)`: prompt i's completion is final (see `generate`)."""


class InferenceEngine(ABC):
    """One engine: generates, and takes new weights from the trainer."""

    weight_version: int = 0

    @abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_completion: OnCompletion | None = None,
    ) -> list[Completion]:
        """Sample one completion per prompt (callers repeat a prompt for a group).

        `on_completion(i, completion)`, if given, is called once for each prompt i with the
        completion that `generate` then returns for it, as soon as it is final, so that the
        caller can score it while the rest are generated (the rollout actor's rewards). It may
        be called from another thread and before `generate` returns, must be quick and must
        not raise. When it comes is the engine's to say (each engine's docstring)."""

    @abstractmethod
    def init_weights_update_group(self, info: GroupInfo, rank_offset: int) -> None:
        """Join the trainer's broadcast group; blocks until every member joined."""

    @abstractmethod
    def check_weights_update(self, plan: list[Bucket]) -> None:
        """Raise before any data flows if the names, dtypes or shapes do not match ours."""

    @abstractmethod
    def update_weights_from_distributed(self, plan: list[Bucket], version: int) -> SyncStats:
        """Receive the buckets the trainer broadcasts, load them, adopt `version`."""

    @abstractmethod
    def weight_checksums(self) -> dict[str, str]:
        """Bit-exact checksum per weight, for verify mode."""

    # Optional hooks, no-ops for an in-process engine; the SGLang engine implements them.

    should_stop: Callable[[], bool] | None = None
    """Set by the rollout actor (Ray's cancel flag of the running call), and read only in the
    thread that called `generate`: once it is true the generation ends early. The transformers
    engine returns partial completions at the next decoding step (the actor discards them);
    the SGLang engine aborts its requests on their servers and raises `GenerationAborted`."""

    weight_ranks: int = 1
    """Ranks the engine takes in the weight group (rank_offset, rank_offset + 1, ...)."""

    url: str | None = None
    """Where the engine serves HTTP requests (None: in-process)."""

    def connect_peers(self, urls: list[str]) -> None:  # noqa: B027
        """Learn every engine's URL, to balance and retry requests over them."""

    def drop_peer(self, url: str) -> None:  # noqa: B027
        """Send no more requests to `url`: its engine went down (`connect_peers` adds it back
        once it has rejoined). May be called while `generate` runs in another thread."""

    def ensure_running(self) -> bool:
        """Restart the engine if it died; True if it did (it then needs the weight group
        rebuilt and a sync before it generates)."""
        return False

    def destroy_weights_update_group(self) -> None:  # noqa: B027
        """Leave the weight group (before the driver builds a new one)."""

    def release_memory(self) -> None:  # noqa: B027
        """Free GPU memory (weights, KV cache, CUDA graphs) while colocated trainers step."""

    def resume_memory(self, regions: tuple[str, ...]) -> None:  # noqa: B027
        """Take back the `regions` (`WEIGHT_MEMORY`, then `CACHE_MEMORY`) released before."""

    def shutdown(self) -> None:  # noqa: B027 (optional hook: engines with nothing to free)
        """Release processes and memory."""
