"""Split rollout batches across data-parallel training ranks, balanced by tokens."""

from data.schema import RolloutBatchRef


def balance_by_tokens(
    batches: list[RolloutBatchRef], num_ranks: int
) -> list[list[RolloutBatchRef]]:
    """Largest-first greedy assignment: each batch goes to the rank with the fewest tokens so far.

    Works on references and counts only; the rows stay in the object store. Ties go to the
    lower rank, so the result is deterministic. A rank may get nothing when there are fewer
    batches than ranks; trainers handle an empty share (they still join the gradient reduce).
    """
    shares: list[list[RolloutBatchRef]] = [[] for _ in range(num_ranks)]
    loads = [0] * num_ranks
    for batch in sorted(batches, key=lambda b: b.num_tokens, reverse=True):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        shares[rank].append(batch)
        loads[rank] += batch.num_tokens
    return shares
