"""Evaluation metrics of one held-out set: k answers per prompt, each scored by the reward.

avg@k is the mean correctness over all k x prompts samples. pass@k is the share of prompts
with at least one correct answer among their k. Exactly k samples are drawn and pass@k is
reported for that same k, so the unbiased estimator 1 - C(n - c, k) / C(n, k) (n = k) is this
plain count: 1 when c > 0, else 0.
"""

from dataclasses import dataclass, fields


@dataclass
class EvalCounts:
    """One engine's share of one set; the driver adds the engines' counts up."""

    prompts: int = 0
    samples: int = 0
    correct: int = 0
    """Samples whose reward reached the correct threshold."""
    solved: int = 0
    """Prompts with at least one correct sample among their k."""
    reward_sum: float = 0.0
    response_tokens: int = 0

    @staticmethod
    def of(rewards: list[float], lengths: list[int], k: int, threshold: float) -> "EvalCounts":
        """The counts of `rewards` and response `lengths` ordered prompt by prompt, k each."""
        if len(rewards) != len(lengths) or len(rewards) % k:
            raise ValueError(f"{len(rewards)} rewards, {len(lengths)} lengths for k={k}")
        correct = [reward >= threshold for reward in rewards]
        prompts = len(rewards) // k
        return EvalCounts(
            prompts=prompts,
            samples=len(rewards),
            correct=sum(correct),
            solved=sum(any(correct[p * k : (p + 1) * k]) for p in range(prompts)),
            reward_sum=float(sum(rewards)),
            response_tokens=sum(lengths),
        )

    def __add__(self, other: "EvalCounts") -> "EvalCounts":
        return EvalCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def set_metrics(name: str, k: int, counts: EvalCounts) -> dict[str, float]:
    """`eval/<name>/...`: mean reward and response length per sample, avg@k, pass@k."""
    samples = max(counts.samples, 1)
    return {
        f"eval/{name}/reward_mean": counts.reward_sum / samples,
        f"eval/{name}/avg@{k}": counts.correct / samples,
        f"eval/{name}/pass@{k}": counts.solved / max(counts.prompts, 1),
        f"eval/{name}/response_length": counts.response_tokens / samples,
    }
