"""Rollout record batches -> micro-batches of tensors, within a token budget.

Sequences are prompt + response, right-padded. Position t of the per-token tensors scores
token t + 1 (the model's next-token prediction), so the response token j of a sample with a
P-token prompt sits at position P - 1 + j.

Packed micro-batches (`train.pack_sequences`) feed the model one row of the rows' tokens back
to back, without padding, and cut its per-token output back into the padded [B, T-1] layout
(`MicroBatch.unpack`): the loss, whose per-sequence terms (sequence means, GSPO, advantages)
read rows, stays the same code on either layout, on B x T scalars, while the model, its
activations and its [tokens, vocab] logits see real tokens only.
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from data.schema import check_schema, ragged
from models.routing import RoutingShape


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    """[B, T] prompt + response token ids, right-padded with 0."""
    attention_mask: torch.Tensor
    """[B, T] 1 on real tokens."""
    targets: torch.Tensor
    """[B, T-1] next token at each position (input_ids shifted left)."""
    loss_mask: torch.Tensor
    """[B, T-1] 1 where the target is a response token that counts in the loss."""
    rollout_log_probs: torch.Tensor
    """[B, T-1] the engine's log-prob of each target (0 off the mask)."""
    advantages: torch.Tensor
    """[B, 1] one advantage per sample, broadcast over its tokens."""
    routed_experts: torch.Tensor | None = None
    """[B, T, moe_layers, top_k] the engine's experts of each input position, to replay
    (routing replay on); positions it did not feed (the last token, padding) hold experts
    0..top_k-1, which can change nothing the loss reads. Packed: [1, N, moe_layers, top_k],
    the rows' own routing back to back (every position of a packed row was fed)."""
    position_ids: torch.Tensor | None = None
    """Packed only: [1, N] each token's position in its own row (from 0). `input_ids`,
    `attention_mask` (ones) and `targets` are then [1, N] too: row b feeds its tokens but the
    last (L_b - 1 of them) and `targets` holds the next token of each; the other fields keep
    the padded [B, T-1] layout."""
    cu_seqlens: torch.Tensor | None = None
    """Packed only: int32 [B + 1] where each row starts in the packed one (flash varlen's
    `cu_seqlens`), and its end."""
    unpack_index: torch.Tensor | None = None
    """Packed only: [B, T-1] the packed position of each padded-layout position, -1 where
    the row has none (padding)."""
    old_log_probs: torch.Tensor | None = None
    """[B, T-1] (the loss's layout) the policy's log-probs of each target before the rollout
    step's first optimizer step, set when a step takes several (train.global_batch_size,
    train.epochs) and the loss reads them; None: the forward's own, detached, are."""
    ref_log_probs: torch.Tensor | None = None
    """[B, T-1] the frozen reference's log-probs of each target (KL term), set when the
    rollout step trains on each micro-batch more than once (train.epochs > 1), so the
    reference runs once per micro-batch; None: computed at the micro-batch's step."""

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(
            **{k: v.to(device) if v is not None else None for k, v in vars(self).items()}
        )

    @property
    def max_seqlen(self) -> int:
        """The longest packed row's token count (packed micro-batches only)."""
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """A per-token tensor of the model's layout ([1, N] packed) in the padded [B, T-1]
        layout the loss reads, 0 on padding; a padded micro-batch's as it is."""
        if self.unpack_index is None:
            return per_token
        index = self.unpack_index
        return torch.where(index >= 0, per_token[0, index.clamp(min=0)], 0.0)


@dataclass
class Rows:
    """The rows of a trainer's share, as views of the Arrow buffers."""

    prompts: list[np.ndarray]
    responses: list[np.ndarray]
    rollout_log_probs: list[np.ndarray]
    loss_masks: list[np.ndarray]
    advantages: np.ndarray
    routing: RoutingShape | None = None
    """Set when the engines' routing is read for replay; `routed_experts` then has a
    [prompt + response - 1, layers, top_k] array per row."""
    routed_experts: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def length(self, i: int) -> int:
        return len(self.prompts[i]) + len(self.responses[i])


def rows_of(batches: list[pa.RecordBatch], routing: RoutingShape | None = None) -> Rows:
    """Views of every row; nothing is copied until a micro-batch is padded. With `routing`
    (routing replay on), each row's `routed_experts` too, checked against that shape."""
    rows = Rows([], [], [], [], np.zeros(0, dtype=np.float32), routing)
    advantages = []
    for batch in batches:
        check_schema(batch)
        columns = [
            ragged(batch, name)
            for name in ("prompt_ids", "response_ids", "rollout_log_probs", "loss_mask")
        ]
        for i in range(batch.num_rows):
            rows.prompts.append(columns[0].row(i))
            rows.responses.append(columns[1].row(i))
            rows.rollout_log_probs.append(columns[2].row(i))
            rows.loss_masks.append(columns[3].row(i))
        if routing is not None:
            rows.routed_experts += _routed_rows(batch, routing, rows, len(rows) - batch.num_rows)
        advantages.append(batch.column("advantage").to_numpy(zero_copy_only=False))
    if advantages:
        rows.advantages = np.concatenate(advantages)
    return rows


def _routed_rows(
    batch: pa.RecordBatch, routing: RoutingShape, rows: Rows, first: int
) -> list[np.ndarray]:
    """The batch's routing, one [positions, layers, top_k] view per row (rows `first`... of
    `rows` hold its prompts and responses)."""
    column = batch.column("routed_experts")
    if column.null_count:
        raise ValueError(
            "algorithm.routing_replay is on but a rollout batch carries no routed_experts: "
            "the engines must record routing (SGLang: --enable-return-routed-experts, which "
            "Sluice sets when routing replay is on)"
        )
    routed = ragged(batch, "routed_experts")
    out = []
    for i in range(batch.num_rows):
        positions = rows.length(first + i) - 1
        row = routed.row(i)
        if row.size != positions * routing.per_position:
            raise ValueError(
                f"routed_experts of a row holds {row.size} ids, expected {positions} positions "
                f"x {routing.layers} MoE layers x top-{routing.top_k}: the engine's model is "
                f"not the trainer's"
            )
        out.append(row.reshape(positions, routing.layers, routing.top_k))
    return out


def split_by_token_budget(rows: Rows, max_tokens: int) -> list[list[int]]:
    """Row indices per micro-batch: consecutive rows while rows x longest row <= max_tokens.

    A single row longer than the budget still gets its own micro-batch (it cannot be split).
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in range(len(rows)):
        longest_with = max(longest, rows.length(i))
        if current and longest_with * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, longest_with = [], rows.length(i)
        current.append(i)
        longest = longest_with
    if current:
        groups.append(current)
    return groups


def pack_by_token_budget(rows: Rows, max_tokens: int) -> list[list[int]]:
    """Row indices per packed micro-batch, the rows' tokens summing to at most max_tokens:
    first-fit decreasing (each row, longest first, goes to the first micro-batch it fits in),
    which fills micro-batches closely on long-tailed lengths. Indices ascend within a
    micro-batch; a row longer than the budget gets its own."""
    groups: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: (-rows.length(i), i)):
        n = rows.length(i)
        fits = next((g for g, load in enumerate(loads) if load + n <= max_tokens), len(groups))
        if fits == len(groups):
            groups.append([])
            loads.append(0)
        groups[fits].append(i)
        loads[fits] += n
    return [sorted(group) for group in groups]


def pack_micro_batch(rows: Rows, indices: list[int]) -> MicroBatch:
    """The rows as one packed row (see `MicroBatch.position_ids`) with the loss fields of
    their padded micro-batch. Row b feeds its first L_b - 1 tokens, the positions whose
    next token is scored: its last token predicts nothing the loss reads, and the engine
    records no routing for it."""
    padded = pad_micro_batch(dataclasses.replace(rows, routing=None), indices)
    fed = [rows.length(i) - 1 for i in indices]
    starts = np.concatenate([[0], np.cumsum(fed)])
    tokens = padded.input_ids
    input_ids = torch.cat([tokens[b, :n] for b, n in enumerate(fed)]).unsqueeze(0)
    targets = torch.cat([tokens[b, 1 : n + 1] for b, n in enumerate(fed)]).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in fed]).unsqueeze(0)
    column = torch.arange(padded.targets.shape[1])
    lengths = torch.tensor(fed).unsqueeze(1)
    unpack_index = torch.where(
        column < lengths, torch.from_numpy(starts[:-1]).unsqueeze(1) + column, -1
    )
    routed = None
    if rows.routing is not None:
        routed = [torch.from_numpy(rows.routed_experts[i].astype(np.int32)) for i in indices]
        routed = torch.cat(routed).unsqueeze(0)
    return dataclasses.replace(
        padded,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        targets=targets,
        routed_experts=routed,
        position_ids=positions,
        cu_seqlens=torch.from_numpy(starts).to(torch.int32),
        unpack_index=unpack_index,
    )


def pad_micro_batch(rows: Rows, indices: list[int]) -> MicroBatch:
    width = max(rows.length(i) for i in indices)
    size = len(indices)
    input_ids = torch.zeros(size, width, dtype=torch.long)
    attention_mask = torch.zeros(size, width, dtype=torch.long)
    loss_mask = torch.zeros(size, width - 1, dtype=torch.float32)
    rollout_log_probs = torch.zeros(size, width - 1, dtype=torch.float32)
    for b, i in enumerate(indices):
        prompt, response = rows.prompts[i], rows.responses[i]
        p, r = len(prompt), len(response)
        input_ids[b, :p] = torch.from_numpy(prompt.astype(np.int64))
        input_ids[b, p : p + r] = torch.from_numpy(response.astype(np.int64))
        attention_mask[b, : p + r] = 1
        loss_mask[b, p - 1 : p - 1 + r] = torch.from_numpy(rows.loss_masks[i].astype(np.float32))
        rollout_log_probs[b, p - 1 : p - 1 + r] = torch.from_numpy(
            rows.rollout_log_probs[i].astype(np.float32)
        )
    advantages = torch.from_numpy(rows.advantages[indices].astype(np.float32)).unsqueeze(1)
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        targets=input_ids[:, 1:].clone(),
        loss_mask=loss_mask,
        rollout_log_probs=rollout_log_probs,
        advantages=advantages,
        routed_experts=_pad_routing(rows, indices, width) if rows.routing else None,
    )


def _pad_routing(rows: Rows, indices: list[int], width: int) -> torch.Tensor:
    shape = rows.routing
    filler = torch.arange(shape.top_k, dtype=torch.int32)  # any k distinct experts will do
    out = filler.expand(len(indices), width, shape.layers, shape.top_k).clone()
    for b, i in enumerate(indices):
        routed = rows.routed_experts[i]
        out[b, : len(routed)] = torch.from_numpy(routed.astype(np.int32))
    return out


def response_log_probs(
    per_token: torch.Tensor, rows: Rows, indices: list[int]
) -> list[torch.Tensor]:
    """Cut a [B, T-1] per-token tensor back into each row's response tokens."""
    out = []
    for b, i in enumerate(indices):
        p, r = len(rows.prompts[i]), len(rows.responses[i])
        out.append(per_token[b, p - 1 : p - 1 + r])
    return out
