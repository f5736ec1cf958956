"""Typed configuration: one dataclass per component, composed into `SluiceConfig`.

Every field carries a docstring (the string literal under it); `config.docs` reads them for
`driver.py --help`. Validation happens once, in `SluiceConfig.validate()`, before any actor
starts; each check names the field and the fix.
"""

import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

from config.errors import UserError

BUILTIN_MODEL = "builtin:tiny-qwen3-moe"
BUILTIN_TASK = "builtin:digits"
BUILTIN_TOOL_TASK = "builtin:lookup"
"""The built-in multi-turn task (tasks/lookup.py): its answer only a tool knows."""


def config_json_readable(model: str) -> bool:
    """Whether `model` (a checkpoint directory, or the built-in model) has a config.json on
    this machine: a cluster's model directory may exist only on its nodes, where the actors
    read it."""
    return model == BUILTIN_MODEL or os.path.isfile(os.path.join(model, "config.json"))


TIS_WITH_ROLLOUT_RATIO = (
    "algorithm.old_log_probs=rollout puts the engine's log-probs into the PPO ratio, and TIS "
    "would correct the same trainer/engine mismatch a second time; set algorithm.old_log_probs "
    "to recompute (or auto), or algorithm.tis=off"
)


@dataclass
class ModelConfig:
    """The policy model: where its Hugging Face checkpoint is and how it is held in memory."""

    hf_checkpoint: str = BUILTIN_MODEL
    """A Hugging Face model directory, or `builtin:tiny-qwen3-moe` (built in code, random init).
    An FP8 checkpoint (its config.json has a block-wise fp8 `quantization_config`, e.g.
    Qwen3-30B-A3B-FP8 or one made by tools/convert_hf_to_fp8.py) switches the rollouts to fp8:
    the engines serve it and every weight sync quantizes the trainers' bf16 weights into its
    format; the trainers then start from `checkpoint.load` or `model.train_checkpoint`."""

    train_checkpoint: str | None = None
    """With an FP8 `hf_checkpoint`: the bf16 Hugging Face directory of the same model that the
    trainers load (config and weights). Not needed with the Megatron backend when
    `checkpoint.load` gives the weights (the seed's way); refused with a bf16 hf_checkpoint."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype in trainers and engines (fp32 on CPU; bf16 on GPUs)."""


@dataclass
class DataConfig:
    """Prompts for training and evaluation."""

    prompt_data: str = BUILTIN_TASK
    """Training prompts: a .jsonl or .parquet file, `builtin:digits` (the synthetic task), or
    `builtin:lookup` (the synthetic tool task, with rollout.environment
    tasks.lookup:LookupEnvironment)."""

    eval_data: str | None = None
    """Held-out prompts (same format); None takes them from the built-in task's held-out split."""

    input_key: str = "prompt"
    """Column or JSON key holding the prompt: a string, or a list of chat messages
    (`[{role: system|user|assistant, content: str}]`, as dapo-math-17k stores it)."""

    label_key: str = "label"
    """Column or JSON key holding the reference answer handed to the reward function."""

    apply_chat_template: bool = True
    """Render prompts with the tokenizer's own chat template (with the generation prompt): a
    message-list prompt as its messages, a plain-text prompt as one user message. A plain-text
    prompt is encoded as-is when the tokenizer has no template; a message-list prompt needs
    this on and a tokenizer with a template."""

    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments for the chat template, e.g. `{enable_thinking: false}` for Qwen3
    (slime's `--apply-chat-template-kwargs`); needs `apply_chat_template`."""

    num_eval_prompts: int = 64
    """How many prompts of each held-out set an evaluation answers (0 = all)."""

    shuffle: bool = True
    """Shuffle training prompts each epoch (seeded by `seed`; a resumed run continues the same
    order). slime's `--rollout-shuffle`; false serves them in file order."""


@dataclass
class SglangConfig:
    """The SGLang engine (`rollout.engine: sglang`): one `sglang.launch_server` per engine node."""

    server_args: dict[str, Any] = field(default_factory=dict)
    """SGLang server flags by name, e.g. `{mem-fraction-static: 0.7, cuda-graph-bs-decode:
    [1, 2, 4]}`; on the command line `--sglang-mem-fraction-static 0.7`. Sluice sets
    --model-path, --tp-size, --nnodes, --node-rank, --dist-init-addr, --host, --port and the
    server's CUDA_VISIBLE_DEVICES from the config and the placement; the dry run shows each
    final command."""

    startup_timeout_s: float = 1200.0
    """How long a server may take to answer /health after launch (loading 30B weights and
    capturing CUDA graphs takes minutes)."""

    request_timeout_s: float = 3600.0
    """How long one /generate or weight-update request may take before the engine counts as
    not answering."""

    max_inflight_per_engine: int = 512
    """Prompt-group requests one RolloutActor keeps in flight per server; SGLang batches them."""


@dataclass
class RolloutConfig:
    """Rollout engines and sampling."""

    engine: str = "transformers"
    """Inference engine type (registry name): `transformers` (in-process, CPU or GPU) or
    `sglang` (SGLang servers on GPUs; see the `sglang` section)."""

    num_engines: int = 1
    """How many RolloutActors (engines) generate in parallel."""

    max_restarts: int = 3
    """Times Ray restarts a rollout actor whose process died, in its own bundle (per actor).
    Its prompt groups go to the live engines meanwhile, and it rejoins the weight group with
    the current weights before it generates again. 0: a dead rollout actor ends the run."""

    gpus_per_engine: int = 1
    """GPUs one engine spans (`rollout_num_gpus_per_engine`); ignored on a cluster with no GPU."""

    batch_size: int = 256
    """Samples generated per RL step; a multiple of samples_per_prompt (whole prompt groups)."""

    samples_per_prompt: int = 8
    """Samples per prompt (the GRPO group size)."""

    max_new_tokens: int = 4
    """Longest response, in tokens."""

    temperature: float = 1.0
    """Sampling temperature; log-probs are taken of the same tempered distribution."""

    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""

    top_k: int = 0
    """Top-k sampling (0 = off)."""

    batching: Literal["static", "continuous"] = "static"
    """`continuous` uses transformers' generate_batch (paged, continuous batching); `static`
    uses generate on padded batches."""

    max_batch_size: int = 256
    """Sequences one static generate call decodes together."""

    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025; slime's --dynamic-sampling-filter-path with its
    check_reward_nonzero_std filter): prompt groups whose rewards are all equal (all right,
    all wrong: zero advantage, no gradient) are dropped, and more prompts are sampled, in up to
    `dynamic_sampling_max_rounds` extra rounds, until the step has `batch_size` samples of
    groups that teach something. Each step reports rollout/filtered_groups and
    rollout/sampling_rounds; a step still short after the last round trains on fewer."""

    dynamic_sampling_max_rounds: int = 4
    """Extra generation rounds a step may take to refill what dynamic sampling dropped."""

    partial: Literal["finish", "abort"] = "finish"
    """What a weight update does to generations still running ahead of training
    (algorithm.max_staleness 1): `finish` waits for them, so their samples are one version
    old; `abort` cancels them (queued ones at once, a running one at its next decoding step
    with the transformers engine, or with SGLang by aborting its requests on their servers,
    their partial tokens dropped) and generates their prompt groups again, same seeds, with
    the new weights. Either way a sample comes from one weight version."""

    reward: str = "tasks.digits:reward"
    """Reward function as `module:function`; see docs/data-and-rewards.md for its signature."""

    reward_workers: int = 2
    """Processes per rollout actor that score samples, each as soon as the engine has produced
    it (overlapping the rest of the generation), one sample at a time each. 0: score in the
    actor itself after the generation, one sample after another, with no time bound (for
    debugging a reward function; rollout.reward_timeout_s then does not apply)."""

    reward_timeout_s: float = 60.0
    """Seconds one sample's reward call may take in a reward worker; past that the worker is
    killed and replaced and the sample scores 0.0, as when the worker process dies. Both are
    counted per step (rollout/reward_timeouts, rollout/reward_crashes)."""

    environment: str | None = None
    """Multi-turn episodes: an environment class as `module:Class` (docs/agents.md), e.g.
    `tasks.lookup:LookupEnvironment`; each sample is then one episode of model turns,
    observations and tool calls, and the environment returns its reward (rollout.reward is
    not used). None: one response per prompt, scored by rollout.reward."""

    agent: str | None = None
    """Multi-turn episodes from agent code that talks to an OpenAI-style chat API: a function
    as `module:function` (docs/agents.md), `agent(base_url, record) -> float`, run once per
    episode against an OpenAI-compatible endpoint at `base_url` whose chat completions are the
    episode's model turns; it returns the episode's reward (rollout.reward is not used). Set
    instead of rollout.environment (the endpoint is the environment)."""

    tools: dict[str, str] = field(default_factory=dict)
    """The tools an environment may call: the name it calls them by -> `module:function`
    (e.g. `{python: rl.tools:python}`); they run in worker processes of a Ray actor beside each
    rollout actor (rl/tools.py)."""

    max_turns: int = 8
    """With an environment: model turns per episode; `episode.generate` returns an empty
    reply past it."""

    max_episode_tokens: int = 4096
    """With an environment: prompt, model and observation tokens per episode (the context an
    episode may fill); a turn's max_new_tokens shrinks to fit, observations are cut."""

    max_tool_calls: int = 8
    """With an environment: tool calls per episode; past it a call returns an error result
    without running."""

    tool_workers: int = 2
    """Tool calls one rollout actor's tool actor runs at once, each in its own worker process."""

    tool_timeout_s: float = 30.0
    """Seconds one tool call may take; past it its worker is killed and replaced, and the
    call returns an error result (counted in rollout/tool_errors)."""

    tool_memory_mb: int = 2048
    """Address-space limit of each tool worker process (MiB)."""

    groups_per_batch: int = 4
    """Prompt groups per Arrow record batch put into the object store (the unit the driver
    balances across trainers)."""

    sglang: SglangConfig = field(default_factory=SglangConfig)
    """SGLang server flags and timeouts (used when engine is sglang)."""

    @property
    def prompts_per_step(self) -> int:
        """Prompt groups generated per step."""
        return self.batch_size // self.samples_per_prompt


@dataclass
class ParallelConfig:
    """How the training ranks are split; the product of the sizes must divide the world."""

    tensor: int = 1
    """Tensor-parallel size (`--tensor-model-parallel-size`); a TP group never crosses a node."""

    pipeline: int = 1
    """Pipeline-parallel size (`--pipeline-model-parallel-size`)."""

    context: int = 1
    """Context-parallel size (`--context-parallel-size`)."""

    expert: int = 1
    """Expert-parallel size (`--expert-model-parallel-size`): the experts of each MoE layer
    are split over this many ranks."""

    expert_tensor: int = 1
    """Tensor-parallel size inside each expert (`--expert-tensor-parallel-size`)."""

    sequence: bool = False
    """Sequence parallelism (`--sequence-parallel`): norms and dropout work on 1/tensor of the
    tokens; needs tensor > 1."""


@dataclass
class TrainConfig:
    """Training actors, backend and optimizer."""

    backend: str = "torch"
    """Training backend type (registry name): `torch` (DDP over a transformers model) or
    `megatron` (megatron-core: tensor, sequence, pipeline, expert parallelism, distributed
    optimizer, CPU Adam, torch_dist checkpoints)."""

    num_workers: int = 1
    """Training ranks (one actor and one GPU each on a GPU cluster)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout of the training ranks."""

    lr: float = 1e-3
    """Adam learning rate."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.99
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon, added to sqrt(v) (`--adam-eps`)."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""

    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """How the learning rate falls after the warm-up (`--lr-decay-style`): `constant` keeps
    `lr`; `linear` and `cosine` go from `lr` down to `min_lr` at optimizer step
    `lr_decay_iters` and stay there. Saved and restored with checkpoints."""

    lr_warmup_iters: int = 0
    """Optimizer steps of linear warm-up (`--lr-warmup-iters`): step k of the first
    lr_warmup_iters trains with lr x k / lr_warmup_iters (the first step with
    lr / lr_warmup_iters, where Megatron-LM's first warm-up step has 0), then the decay
    starts."""

    min_lr: float = 0.0
    """The learning rate a `linear` or `cosine` decay ends at (`--min-lr`)."""

    lr_decay_iters: int | None = None
    """The optimizer step at which the decay reaches `min_lr` (`--lr-decay-iters`). Unset:
    the run's optimizer steps, num_steps x rollout.batch_size / global_batch_size (1 with
    global_batch_size 0) x epochs; or, when resuming, the value the checkpoint's run used, so
    the schedule goes on as it was planned."""

    global_batch_size: int = 0
    """Samples per optimizer step (slime's `--global-batch-size`): a rollout step's samples
    are split into ceil(samples / global_batch_size) mini-batches, each one optimizer step.
    0 = the whole rollout batch in one step. Must divide rollout.batch_size (as slime
    asserts); a step with fewer samples (dynamic sampling, staleness) takes fewer steps, never
    a larger one, and drops none. Each data-parallel rank cuts its own token-balanced share
    into that many contiguous parts of near-equal size, so a mini-batch holds
    global_batch_size samples give or take one per rank. Prompt groups may be split: the
    advantages are computed before training. Each step's loss is normalized by its own
    mini-batch (its loss tokens, or samples with sequence_mean)."""

    epochs: int = 1
    """Passes over a rollout step's mini-batches (verl's `ppo_epochs`; slime has no such
    flag: its `--num-epoch` counts passes over the prompt data), each pass in the same
    order. With more than one optimizer step per rollout step, the trainer's old log-probs
    (the ratio's denominator with algorithm.old_log_probs recompute, and the TIS / MIS
    weights) are computed once, before the first step, so the PPO clip acts on the later
    ones. Metrics are means over the optimizer steps (train/optimizer_steps counts them)."""

    max_tokens_per_micro_batch: int = 8192
    """Token budget of one forward/backward (padded tokens count; packed: the rows' tokens);
    bounds activation memory (`--max-tokens-per-gpu`)."""

    log_prob_chunk_tokens: int = 1024
    """Tokens whose log-probs and entropy are taken at a time (slime's
    `--log-probs-chunk-size`): the output layer is applied to this many hidden states at once,
    and the backward recomputes each chunk's logits, so no [tokens, vocabulary] logits tensor
    exists (at 8k tokens and a 151k vocabulary its fp32 copy alone is 5 GB). Both backends;
    vocabulary-parallel under Megatron's tensor parallelism. 0 (or slime's default -1): all of
    a micro-batch's tokens in one chunk."""

    pack_sequences: bool = False
    """Pack rows into one sequence of at most `max_tokens_per_micro_batch` tokens per
    micro-batch, without padding: each row keeps its own positions (from 0) and attends only
    to itself (variable-length attention: flash varlen on GPUs in bf16, exact per-row SDPA on
    the CPU); with routing replay only real tokens are replayed, except Megatron's remaining
    padding (a sequence-parallel row's tail up to a multiple of the tensor size, and the
    padding micro-batches of a rank with fewer; docs/megatron.md#packed-sequences). Off: rows
    are right-padded to the longest of their micro-batch. slime: `--use-dynamic-batch-size`."""

    layer_spec: Literal["torch", "local"] = "torch"
    """Megatron: the expert and attention modules, without Transformer Engine. `torch`: all
    local experts in two grouped GEMMs (torch's grouped_mm on Hopper GPUs in bf16; a loop over
    experts elsewhere) and attention through scaled_dot_product_attention (flash on Hopper).
    `local`: megatron-core's local spec (SequentialMLP, one GEMM per expert; unfused
    attention), for comparison. `--moe-grouped-gemm` sets `torch`, `--moe-grouped-gemm false`
    sets `local`."""

    recompute_granularity: Literal["off", "full", "selective"] = "off"
    """Activation recompute (`--recompute-granularity`): keep fewer activations in the
    forward and compute them again in the backward, trading compute for memory; losses and
    gradients are unchanged. `full`: whole transformer layers (Megatron; the torch backend's
    gradient checkpointing of decoder layers); `selective`: the core attention of each layer
    only (Megatron only; megatron-core's default `--recompute-modules core_attn`). With
    algorithm.routing_replay the recomputed forward replays the same experts; refused with
    pipeline parallelism (see docs/algorithms.md)."""

    recompute_method: Literal["uniform", "block"] = "uniform"
    """With recompute_granularity full (`--recompute-method`): `uniform` recomputes every
    layer, in chunks of recompute_num_layers layers; `block` recomputes only the first
    recompute_num_layers layers (of each pipeline stage) and keeps the rest's activations.
    The torch backend takes uniform with 1 layer, or block."""

    recompute_num_layers: int = 1
    """With recompute_granularity full (`--recompute-num-layers`): layers per recomputed
    chunk (uniform), or how many layers are recomputed (block)."""

    use_distributed_optimizer: bool = True
    """Megatron: shard optimizer state over data-parallel ranks (`--use-distributed-optimizer`)."""

    optimizer_cpu_offload: bool = False
    """Megatron: keep optimizer state on the CPU and step there (CPU Adam,
    `--optimizer-cpu-offload`)."""

    overlap_cpu_optimizer_d2h_h2d: bool = False
    """Megatron, with CPU Adam: overlap the gradient and parameter copies between GPU and host
    (`--overlap-cpu-optimizer-d2h-h2d`)."""

    use_precision_aware_optimizer: bool = False
    """Megatron: let the optimizer hold its fp32 master weights and moments itself
    (`--use-precision-aware-optimizer`)."""

    overlap_cpu_adam_with_forward: bool = False
    """Megatron, with CPU Adam: run the host optimizer step on a worker thread while the next
    forward runs, each layer waiting only for its own parameters (the same update, bit for
    bit; docs/megatron.md). Needs optimizer_cpu_offload, overlap_cpu_optimizer_d2h_h2d,
    use_distributed_optimizer and use_precision_aware_optimizer."""

    cpu_adam_on_multiple_nodes: bool = False
    """Keep CPU Adam when the trainers span several nodes; by default it is turned off there
    with a notice (the distributed optimizer already shards the optimizer state)."""

    def optimizer_steps_per_rollout(self, rollout_batch_size: int) -> int:
        """Optimizer steps of a full rollout step: its mini-batches, times the epochs."""
        per_pass = rollout_batch_size // self.global_batch_size if self.global_batch_size else 1
        return per_pass * self.epochs

    def check_lr_schedule(self, planned_steps: int) -> None:
        """Refuse schedule settings that cannot hold or would do nothing (called by
        `SluiceConfig.validate`; `planned_steps`: the run's optimizer steps)."""
        if self.lr_warmup_iters < 0:
            raise UserError(
                f"train.lr_warmup_iters={self.lr_warmup_iters} must be >= 0 (optimizer steps "
                f"of warm-up; 0 = none)"
            )
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(
                f"train.min_lr={self.min_lr:g} must be in [0, train.lr={self.lr:g}]: the "
                f"decay goes from lr down to min_lr"
            )
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise UserError(f"train.lr_decay_iters={self.lr_decay_iters} must be >= 1")
        if self.lr_decay_style == "constant":
            given = {"train.min_lr": self.min_lr, "train.lr_decay_iters": self.lr_decay_iters}
            unused = [f"{k}={v}" for k, v in given.items() if v]
            if unused:
                raise UserError(
                    f"{', '.join(unused)} has no effect with train.lr_decay_style=constant; set "
                    f"lr_decay_style to linear or cosine, or leave them unset"
                )
            return
        decay, unset = self.lr_decay_iters, ""
        if decay is None:
            decay, unset = planned_steps, " (unset: the run's optimizer steps)"
        if decay <= self.lr_warmup_iters:
            raise UserError(
                f"train.lr_decay_iters={decay}{unset} must be above train.lr_warmup_iters="
                f"{self.lr_warmup_iters}: the {self.lr_decay_style} decay runs from the end of "
                f"the warm-up to that step"
            )

    def check_steps_and_recompute(self, rollout_batch_size: int) -> None:
        """Refuse mini-batch and recompute settings that cannot hold (called by
        `SluiceConfig.validate`; what only one backend cannot do, `training` checks)."""
        gbs = self.global_batch_size
        if gbs < 0:
            raise UserError(f"train.global_batch_size={gbs} must be >= 0 (0 = the whole batch)")
        if gbs and rollout_batch_size % gbs:
            divisors = [d for d in range(1, rollout_batch_size + 1) if rollout_batch_size % d == 0]
            raise UserError(
                f"train.global_batch_size={gbs} does not divide rollout.batch_size="
                f"{rollout_batch_size}: each rollout step is cut into whole mini-batches; use "
                f"one of {divisors[-6:]} (or 0 for one step)"
            )
        p = self.parallel
        data_parallel = self.num_workers // max(1, p.tensor * p.pipeline * p.context)
        if gbs and gbs < data_parallel:
            raise UserError(
                f"train.global_batch_size={gbs} is below the {data_parallel} data-parallel "
                f"ranks: every mini-batch needs a sample on each rank; use at least "
                f"{data_parallel}, or 0 for one step"
            )
        _positive(self, "epochs", "train.")
        _positive(self, "recompute_num_layers", "train.")
        if self.recompute_granularity != "full" and (
            self.recompute_method != "uniform" or self.recompute_num_layers != 1
        ):
            raise UserError(
                f"train.recompute_method={self.recompute_method} and "
                f"train.recompute_num_layers={self.recompute_num_layers} apply only with "
                f"train.recompute_granularity=full (it is {self.recompute_granularity}); "
                f"set it to full, or leave them at uniform and 1"
            )


@dataclass
class CheckpointConfig:
    """Saving and resuming training (Megatron backend: torch_dist checkpoints; torch backend:
    one torch_state.pt), in one save-root layout."""

    load: str | None = None
    """Start from this directory (`--load`): a `save` directory of an earlier run (or one of
    its `iter_NNNNNNN` folders), which is resumed (model, optimizer, step, data position,
    weight version and RNG), or, with the Megatron backend, a torch_dist checkpoint written by
    tools/convert_hf_to_torch_dist.py."""

    save: str | None = None
    """Write checkpoints under this directory (`--save`); each goes to a new `iter_NNNNNNN`
    folder and becomes the latest only once complete."""

    save_interval: int = 0
    """Save every N steps (`--save-interval`; 0 = only at the end when `save` is set)."""

    keep_last: int = 0
    """Keep only the newest N checkpoints under `save` (0 = keep every one, as Megatron-LM and
    slime do). After each save is complete and has become the latest, older ones are deleted;
    never the latest, nor the one this run started from (`load`). An MoE checkpoint with its
    optimizer state takes hundreds of GB."""

    max_restarts: int = 3
    """Times the driver restarts the training group when a training actor's process dies:
    new actors in the same bundles resume from the last checkpoint this run saved (or the one
    it started from, `load`, or the run's start without one), never a newer one another run
    wrote under `save`, while the engines stay up. 0: a dead training actor ends the run."""

    def check(self) -> None:
        """Refuse settings that cannot hold (called by `SluiceConfig.validate`)."""
        for key in ("save_interval", "keep_last"):
            value = getattr(self, key)
            if value < 0:
                raise UserError(f"checkpoint.{key}={value} must be >= 0")
            if value and not self.save:
                raise UserError(
                    f"checkpoint.{key}={value} needs checkpoint.save (--save DIR): where "
                    f"the checkpoints are written"
                )
        if self.max_restarts < 0:
            raise UserError(
                f"checkpoint.max_restarts={self.max_restarts} must be >= 0 (0 = a dead actor "
                f"ends the run)"
            )


@dataclass
class TimeoutsConfig:
    """How long each phase of a step may take before the run is declared stuck: the actors
    still busy are named, their stacks dumped into `<output_dir>/stuck/`, and the run exits 1
    (never a silent hang). Each bound covers the whole phase, on every actor."""

    rollout_s: float = 3600.0
    """Generation and rewards of one step (long responses of a 30B model take minutes)."""

    train_s: float = 3600.0
    """One step's training on every training rank (all its optimizer steps)."""

    sync_s: float = 1800.0
    """The weight update into every engine (with engine restarts and group rebuilds)."""

    save_s: float = 3600.0
    """Writing one checkpoint."""


@dataclass
class AlgorithmConfig:
    """The RL objective (GRPO family)."""

    normalize_advantage_std: bool = True
    """Divide group-centred rewards by the group's std (GRPO); False gives Dr.GRPO."""

    advantage: Literal["group", "reinforce_plus_plus_baseline"] = "group"
    """`group`: each sample's reward against its prompt group's (GRPO, or Dr.GRPO without
    the std). `reinforce_plus_plus_baseline` (REINFORCE++ with a group baseline, Hu et al.
    2025; slime's --advantage-estimator reinforce_plus_plus_baseline): the group mean is
    subtracted, then the whole step's batch is normalized by its own mean and std, which
    keeps the scale stable without dividing each group by its own (noisy, often tiny) std;
    normalize_advantage_std is then not used."""

    loss: Literal["grpo", "gspo"] = "grpo"
    """Policy loss. `grpo`: PPO's clipped surrogate per token (with clip-higher). `gspo`
    (Group Sequence Policy Optimization, Zheng et al. 2025; slime's --advantage-estimator
    gspo): one importance ratio per sequence, the geometric mean of its token ratios, clipped
    per sequence, every token of the sequence sharing its loss; meant for MoE models, whose
    token ratios are noisy when the routing shifts. GSPO's clip range is far narrower than
    PPO's and its objective is a mean over sequences: with `gspo`, clip_low 3e-4, clip_high
    4e-4 (the paper's) and loss_aggregation sequence_mean are taken for each of the three that
    neither the recipe nor the command line (load_config's overrides) sets; the start-up line
    says which values the run trains with."""

    clip_low: float = 0.2
    """Lower clip of the importance ratio: ratio >= 1 - clip_low (loss gspo: 3e-4 unless set)."""

    clip_high: float = 0.28
    """Upper clip of the importance ratio: ratio <= 1 + clip_high (loss gspo: 4e-4 unless
    set)."""

    kl_coef: float = 0.0
    """Weight of the KL loss to the frozen reference model (0 = no reference model)."""

    kl_type: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    """KL estimator: k1 (log-ratio), k2 (squared), k3 / low_var_kl (clamped k3)."""

    entropy_coef: float = 0.0
    """Weight of the entropy bonus (slime's `--entropy-coef`): the loss is the policy loss
    minus entropy_coef x the policy's entropy per response token, aggregated like the loss
    (`loss_aggregation`). 0 = off: the entropy is still reported (`train/entropy`) but takes
    no gradient and no memory for one."""

    max_staleness: int = 0
    """How many weight versions behind the trainer a trained sample may be: 0 or 1. 0:
    on-policy, each step's rollouts come from the weights of the step before (engines and
    trainers take turns). 1: one-step-off, the next step's rollouts are generated while this
    step trains (engines and trainers overlap). 2 or more is refused: the engines finish (or,
    with rollout.partial abort, cancel) every running generation before each weight update, so
    at most one step's generation overlaps training whatever the bound; a deeper queue only
    trains on older samples (bench/RESULTS.md: 2 was no faster than 1). Needs engines on their
    own GPUs (placement.colocate=false); the ratio's denominator is then the generating
    version's log-probs (old_log_probs rollout, or TIS against them)."""

    old_log_probs: Literal["auto", "rollout", "recompute"] = "auto"
    """Denominator of the importance ratio: the engine's log-probs (`rollout`, corrects for any
    trainer/engine mismatch inside the clipped ratio) or the trainer's own before the rollout
    step's first update (`recompute`; with one optimizer step per rollout batch the ratio is
    then exactly 1 and the mismatch is only reported, or corrected by TIS; with mini-batches or
    epochs, train.global_batch_size / train.epochs, it moves after the first step and the clip
    acts). auto = recompute when TIS is on, else rollout."""

    tis: Literal["auto", "on", "off"] = "auto"
    """Truncated importance sampling: weight each token's loss by min(exp(trainer log-prob -
    rollout log-prob), tis_cap), correcting for the engines sampling from a slightly different
    policy than the trainer's (fp8 weights, other kernels). auto = on when the engines serve an
    FP8 checkpoint, unless old_log_probs is rollout: that ratio already corrects the mismatch
    (inside its clip), and TIS would correct it a second time, so `on` with it is refused."""

    tis_cap: float = 2.0
    """C of TIS: the largest weight a token gets (>= 1; slime's --tis-clip)."""

    tis_floor: float = 0.0
    """The smallest weight a token gets (in [0, 1]; slime's --tis-clip-low): 0 truncates
    only from above, as the TIS paper does."""

    tis_level: Literal["token", "sequence", "geometric"] = "token"
    """`token`: each token's own ratio; `sequence`: the sequence's ratio as the product of its
    token ratios (the importance weight of the whole sample; it drifts with the length, so on
    long responses nearly every sequence sits at the cap or the floor); `geometric`: the
    geometric mean of its token ratios (a per-token average that stays near 1 whatever the
    length, GSPO's form). The sequence's value is clamped and given to each of its tokens."""

    mis: Literal["off", "token", "sequence", "geometric"] = "off"
    """Masked importance sampling: drop from the loss the tokens (`token`), or whole sequences
    (`sequence`: by the product of their token ratios; `geometric`: by its geometric mean, the
    form for long responses, whose product leaves any fixed bounds), whose trainer/engine ratio
    exp(trainer log-prob - rollout log-prob) lies outside [mis_low, mis_high], instead of
    reweighting them as TIS does; they keep counting in the loss normalizer. Combines with
    TIS (the kept tokens are then weighted). With loss gspo, the sequence ratio is taken over
    the kept tokens only, so a dropped token's log-prob gets no gradient."""

    mis_low: float = 0.5
    """Smallest trainer/engine ratio kept by MIS (in (0, 1])."""

    mis_high: float = 2.0
    """Largest trainer/engine ratio kept by MIS (>= 1)."""

    loss_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    """`token_mean`: every response token of the step weighs the same (across all ranks);
    `sequence_mean`: each sample's tokens are averaged first (loss gspo: sequence_mean unless
    set)."""

    routing_replay: bool = False
    """Rollout routing replay (R3, Ma et al. 2025; slime's --use-rollout-routing-replay): the
    engines record which experts every token was routed to in every MoE layer, the ids travel
    in the rollout batch (`routed_experts`, one byte per id up to 256 experts), and the
    trainers force the same experts in their forwards (the loss and any log-prob recompute),
    their gate weights still trained through the softmax at those experts. Removes the
    mismatch that comes from the trainer's router picking other experts than the engine's."""


GSPO_DEFAULTS: dict[str, float | str] = {
    "clip_low": 3e-4,
    "clip_high": 4e-4,
    "loss_aggregation": "sequence_mean",
}
"""GSPO's own values (Zheng et al. 2025) of the `algorithm` keys whose defaults are PPO's:
PPO's clip range (0.2 / 0.28) would almost never clip a sequence ratio, the geometric mean of
token ratios. `load_config` takes them for `loss: gspo` wherever the recipe and the overrides
leave the key unset."""


def take_loss_defaults(algorithm: AlgorithmConfig, given: Collection[str]) -> None:
    """With `loss: gspo`, set each key of `GSPO_DEFAULTS` that the user did not set (`given`:
    the dotted keys set by the recipe or the overrides, e.g. `algorithm.clip_low`) to GSPO's
    value. A value the user set wins, whatever it is."""
    if algorithm.loss != "gspo":
        return
    for name, value in GSPO_DEFAULTS.items():
        if f"algorithm.{name}" not in given:
            setattr(algorithm, name, value)


def loss_settings_line(algorithm: AlgorithmConfig) -> str | None:
    """A GSPO run's start-up line: the clip range and aggregation it trains with, each marked
    GSPO's value or set to another (None for other losses, whose defaults are PPO's)."""
    if algorithm.loss != "gspo":
        return None
    parts = []
    for name, gspo in GSPO_DEFAULTS.items():
        value = getattr(algorithm, name)
        origin = "GSPO's" if value == gspo else f"not GSPO's {gspo}"
        parts.append(f"{name} {value} ({origin})")
    return f"GSPO with {', '.join(parts)}"


@dataclass
class WeightSyncConfig:
    """How new weights travel from the trainer to the engines after every step."""

    bucket_size_mb: int = 64
    """Bytes per broadcast bucket (MiB); bounds the staging memory on both sides."""

    verify: bool = False
    """After each sync, compare per-tensor checksums on trainer and engines (slower)."""

    backend: Literal["auto", "nccl", "gloo", "ipc"] = "auto"
    """Transport: `nccl` or `gloo` broadcast, or `ipc` (CUDA IPC handles, for engines on the
    trainers' GPUs). auto = NCCL between distinct GPUs, IPC for colocated engines on GPUs,
    else gloo."""

    timeout_s: float = 300.0
    """How long joining the group, and each transfer, may wait for a peer before failing."""


@dataclass
class PlacementConfig:
    """How actors are packed onto the cluster."""

    colocate: bool = False
    """Trainers and engines share the same GPUs (True) or take disjoint GPUs (False)."""

    cpus_per_bundle: float = 1.0
    """CPUs reserved with each GPU bundle (or each actor on a cluster with no GPU)."""

    use_gpus: Literal["auto", "yes", "no"] = "auto"
    """Place on GPUs: auto = when the cluster has any."""


@dataclass
class EvalConfig:
    """Held-out evaluation: which prompt sets, and how each prompt is answered.

    Defaults keep the evaluation every run had before named sets: one set, `held_out`
    (data.eval_data, or the built-in task's held-out split), one greedy answer per prompt."""

    prompt_data: dict[str, str] = field(default_factory=dict)
    """Named sets {name: .jsonl or .parquet path}, each reported as `eval/<name>/...` (slime's
    `--eval-prompt-data NAME PATH ...`); empty = the one set `held_out` described above. Read
    with data.input_key / data.label_key and cut to data.num_eval_prompts prompts each."""

    samples_per_prompt: int = 1
    """k: answers sampled per prompt; avg@k and pass@k are computed over them."""

    max_new_tokens: int | None = None
    """Response length limit of evaluation; None = rollout.max_new_tokens."""

    temperature: float | None = None
    """0 = greedy. None = greedy for one sample per prompt, rollout.temperature for several
    (slime's eval inherits the rollout temperature)."""

    top_p: float | None = None
    """Nucleus sampling of evaluation; None = rollout.top_p. Unused when greedy."""

    overlap_training: bool = False
    """Let an evaluation between steps run on the engines while the next step trains,
    instead of holding the loop: its results are collected before the next weight update
    (so it scores the weights it started on) and logged at its own step, before the next
    step's line. It saves up to one step's training time per evaluation when the engines have
    GPUs of their own; it delays the generation queued behind it on each engine (with
    algorithm.max_staleness 1, the one running ahead). Refused with placement.colocate (the
    engines give their memory to the trainers). The first evaluation, before step 1, and the
    last, after the final step, always wait."""

    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or left unset with one sample per prompt."""
        if self.temperature is None:
            return self.samples_per_prompt == 1
        return self.temperature == 0

    def check(self, data: DataConfig) -> None:
        """The section's own rules; UserError naming the field and the fix."""
        _positive(self, "samples_per_prompt", "eval.")
        if self.max_new_tokens is not None:
            _positive(self, "max_new_tokens", "eval.")
        if self.temperature is not None and self.temperature < 0:
            raise UserError(f"eval.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"eval.top_p={self.top_p} must be in (0, 1]")
        if self.greedy() and self.samples_per_prompt > 1:
            raise UserError(
                f"eval.samples_per_prompt={self.samples_per_prompt} with eval.temperature 0 "
                f"would decode {self.samples_per_prompt} identical greedy answers: set "
                f"eval.temperature > 0 (--eval-temperature), or samples_per_prompt 1"
            )
        for name, path in self.prompt_data.items():
            if not name or "/" in name or not isinstance(path, str) or not path:
                raise UserError(
                    f"eval.prompt_data: {name!r}: {path!r} needs a name without '/' and a "
                    f"path (--eval-prompt-data NAME PATH [NAME PATH ...])"
                )

    def replaced_default(self, data: DataConfig) -> str | None:
        """What to tell when named sets replace a data.eval_data that is set (a recipe's
        AIME file, say, under slime's --eval-prompt-data): it is not evaluated."""
        if not self.prompt_data or data.eval_data is None:
            return None
        return (
            f"data.eval_data={data.eval_data} is not evaluated: eval.prompt_data names the "
            f"sets ({', '.join(self.prompt_data)}); add it as one of them to keep it"
        )


@dataclass
class LoggingConfig:
    """Where results and metrics go."""

    output_dir: str = "outputs/tiny"
    """Run directory: metrics.jsonl, TensorBoard events (and W&B's, MLflow's files:
    logging.backends), final model, summary.json."""

    eval_every: int = 10
    """Evaluate every N steps (0 = only before the first and after the last step)."""

    progress_bar: bool = True
    """Show a progress bar on the driver's terminal; never when stdout is not a terminal (a
    log file, `ray job logs`), which gets one line per step either way."""

    save_final_model: bool = True
    """Write the trained policy as a Hugging Face directory at the end."""

    overwrite: bool = False
    """Replace the results of an earlier run in output_dir (its metrics.jsonl, summary.json,
    config.json, tracking.json, tensorboard/, wandb/, mlruns/, final_model/) once this run
    writes its first metrics. Without
    it a folder holding another run's results is refused, unless the run resumes from a
    checkpoint (--load), whose metrics then continue from the checkpoint's step."""

    backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where every step's numbers go besides metrics.jsonl: any of tensorboard (tensorboard/),
    wandb (Weights & Biases), mlflow. The same keys at the same steps in each."""

    wandb_project: str = "sluice"
    """W&B project (with wandb in logging.backends)."""

    wandb_team: str = ""
    """W&B entity (team or user); empty = the API key's default entity."""

    wandb_group: str = ""
    """W&B run group; empty = none."""

    wandb_run_id: str = ""
    """W&B run id; empty = a new id, kept in output_dir/tracking.json so that a run resumed
    from a checkpoint (--load) into the same output_dir continues the same W&B run."""

    wandb_mode: Literal["", "online", "offline", "disabled"] = ""
    """online, offline (files under wandb_dir only; `wandb sync` uploads them later) or
    disabled; empty = W&B's own choice (the WANDB_MODE variable, else online)."""

    wandb_dir: str = ""
    """Folder that holds W&B's wandb/ files; empty = output_dir."""

    wandb_host: str = ""
    """W&B server URL (a self-hosted W&B); empty = W&B's own choice (WANDB_BASE_URL, else
    the public service). The API key comes from WANDB_API_KEY or `wandb login`."""

    mlflow_tracking_uri: str = ""
    """MLflow tracking URI; empty = a file store at output_dir/mlruns
    (`uv run mlflow ui --backend-store-uri OUTPUT_DIR/mlruns`)."""

    mlflow_experiment: str = "sluice"
    """MLflow experiment name (made if missing)."""

    def check(self) -> None:
        """The backends are known, and no W&B or MLflow setting is given for a backend that
        is off (it would be silently ignored)."""
        known = ("tensorboard", "wandb", "mlflow")
        unknown = [name for name in self.backends if name not in known]
        if unknown or len(set(self.backends)) != len(self.backends):
            raise UserError(
                f"logging.backends={self.backends}: each of {', '.join(known)} at most once "
                f"(e.g. --logging.backends tensorboard,wandb)"
            )
        defaults = LoggingConfig()
        for prefix in ("wandb", "mlflow"):
            given = [
                f.name
                for f in fields(self)
                if f.name.startswith(prefix + "_")
                and getattr(self, f.name) != getattr(defaults, f.name)
            ]
            if given and prefix not in self.backends:
                with_it = ",".join([*self.backends, prefix])
                raise UserError(
                    f"logging.{given[0]} is set but logging.backends={self.backends} has no "
                    f"{prefix}; add it (--logging.backends {with_it}"
                    + (" or --use-wandb" if prefix == "wandb" else "")
                    + f") or drop logging.{given[0]}"
                )


@dataclass
class SluiceConfig:
    """The root config: one run."""

    num_steps: int = 80
    """RL steps (rollout, train, weight sync) to run."""

    seed: int = 1234
    """Seed for model init, data order and sampling."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation prompts."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engines, sampling and rewards."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Training ranks, backend and optimizer."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The RL objective."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming training state."""

    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Trainer -> engine weight transfer."""

    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    """Deadlines of the loop's phases."""

    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Packing actors onto the cluster."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Outputs and evaluation cadence."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation sets and their sampling."""

    def validate(self) -> "SluiceConfig":
        """Check cross-field rules once, before anything starts. Returns self."""
        _positive(self, "num_steps")
        _check_floats_finite(self)
        r, t, a = self.rollout, self.train, self.algorithm
        for name in (
            "num_engines",
            "gpus_per_engine",
            "batch_size",
            "samples_per_prompt",
            "max_new_tokens",
            "max_batch_size",
            "groups_per_batch",
        ):
            _positive(r, name, "rollout.")
        for name in ("num_workers", "max_tokens_per_micro_batch"):
            _positive(t, name, "train.")
        t.check_steps_and_recompute(r.batch_size)
        for name in ("tensor", "pipeline", "context", "expert", "expert_tensor"):
            _positive(t.parallel, name, "train.parallel.")
        if t.lr <= 0:
            raise UserError(f"train.lr={t.lr} must be > 0")
        t.check_lr_schedule(self.num_steps * t.optimizer_steps_per_rollout(r.batch_size))
        if t.weight_decay < 0:
            raise UserError(f"train.weight_decay={t.weight_decay} must be >= 0")
        if t.adam_eps <= 0:
            raise UserError(f"train.adam_eps={t.adam_eps} must be > 0 (Adam divides by it)")
        if r.temperature <= 0:
            raise UserError(
                "rollout.temperature must be > 0 for sampling (greedy decoding is used for "
                "evaluation only)"
            )
        if not 0 < r.top_p <= 1:
            raise UserError(f"rollout.top_p={r.top_p} must be in (0, 1]")
        if r.samples_per_prompt < 2:
            raise UserError(
                "rollout.samples_per_prompt must be >= 2: GRPO normalizes rewards within a "
                "group of samples of one prompt"
            )
        if r.batch_size % r.samples_per_prompt:
            raise UserError(
                f"rollout.batch_size={r.batch_size} is not divisible by "
                f"rollout.samples_per_prompt={r.samples_per_prompt}: a step generates whole "
                f"prompt groups; use a multiple such as "
                f"{max(1, r.batch_size // r.samples_per_prompt) * r.samples_per_prompt}"
            )
        p = t.parallel
        model_parallel = p.tensor * p.pipeline * p.context
        if t.num_workers % model_parallel:
            raise UserError(
                f"train.num_workers={t.num_workers} is not divisible by tensor x pipeline x "
                f"context = {p.tensor} x {p.pipeline} x {p.context}; change one of them"
            )
        data_parallel = t.num_workers // model_parallel
        if r.prompts_per_step < max(data_parallel, r.num_engines):
            raise UserError(
                f"rollout.batch_size={r.batch_size} gives {r.prompts_per_step} prompt groups, "
                f"fewer than the {data_parallel} data-parallel training ranks or the "
                f"{r.num_engines} engines; raise it"
            )
        if a.clip_low < 0 or a.clip_high < 0 or a.clip_low >= 1:
            raise UserError("algorithm.clip_low must be in [0, 1) and algorithm.clip_high >= 0")
        if a.kl_coef < 0:
            raise UserError("algorithm.kl_coef must be >= 0")
        if a.entropy_coef < 0:
            raise UserError(
                f"algorithm.entropy_coef={a.entropy_coef:g} must be >= 0 (a bonus for entropy; "
                f"0 = off)"
            )
        if t.log_prob_chunk_tokens < -1:
            raise UserError(
                f"train.log_prob_chunk_tokens={t.log_prob_chunk_tokens} must be >= -1 (0, or "
                f"slime's -1: a micro-batch's tokens in one chunk)"
            )
        if a.tis_cap < 1:
            raise UserError(
                f"algorithm.tis_cap={a.tis_cap} must be >= 1: TIS weights are min(ratio, cap), "
                f"and a cap below 1 would shrink every token's weight"
            )
        if not 0 <= a.tis_floor <= 1:
            raise UserError(
                f"algorithm.tis_floor={a.tis_floor} must be in [0, 1]: TIS weights are "
                f"clamp(ratio, floor, cap), and a floor above 1 would raise every token's weight"
            )
        if a.tis == "on" and a.old_log_probs == "rollout":
            raise UserError(TIS_WITH_ROLLOUT_RATIO)
        if not (0 < a.mis_low <= 1 <= a.mis_high):
            raise UserError(
                f"algorithm.mis_low={a.mis_low:g} and mis_high={a.mis_high:g} must satisfy "
                f"0 < mis_low <= 1 <= mis_high: MIS keeps the tokens whose ratio lies between"
            )
        if a.max_staleness < 0:
            raise UserError(f"algorithm.max_staleness={a.max_staleness} must be >= 0")
        if a.max_staleness > 1:
            # No generation may run while the weights change, so a deeper queue would only
            # hand the trainer older samples (bench/RESULTS.md, "More than one step ahead").
            raise UserError(
                f"algorithm.max_staleness={a.max_staleness} is more than 1: the engines drain "
                f"before every weight update (no generation runs while the weights change), so "
                f"a queue deeper than one step adds staleness without overlap: set "
                f"algorithm.max_staleness=1 (one-step-off) or 0"
            )
        if a.routing_replay and r.engine == "transformers" and r.batching == "continuous":
            raise UserError(
                "algorithm.routing_replay records each token's experts during generation, which "
                "the transformers engine does with static batching only: set "
                "rollout.batching=static, or use rollout.engine=sglang"
            )
        if r.dynamic_sampling_max_rounds < 0:
            raise UserError(
                f"rollout.dynamic_sampling_max_rounds={r.dynamic_sampling_max_rounds} must be >= 0"
            )
        _check_reward_scoring(r)
        _check_environment(r)
        if self.eval.overlap_training and self.placement.colocate:
            raise UserError(
                "eval.overlap_training runs evaluations while the trainers step, and colocated "
                "engines give the trainers their GPU memory then: set eval.overlap_training "
                "false, or placement.colocate false"
            )
        if r.partial == "abort" and not a.max_staleness:
            raise UserError(
                "rollout.partial=abort cancels generations running ahead of training at a "
                "weight update; with algorithm.max_staleness=0 none runs ahead: set "
                "max_staleness >= 1, or leave rollout.partial at finish"
            )
        if a.max_staleness and self.placement.colocate:
            raise UserError(
                f"algorithm.max_staleness={a.max_staleness} overlaps generation with training, "
                f"and colocated engines share the trainers' GPUs (they release their memory "
                f"while the trainers step): set placement.colocate=false, or max_staleness 0"
            )
        if self.weight_sync.bucket_size_mb <= 0:
            raise UserError("weight_sync.bucket_size_mb must be > 0")
        if self.weight_sync.timeout_s <= 0:
            raise UserError("weight_sync.timeout_s must be > 0")
        for name, seconds in vars(self.timeouts).items():
            if seconds <= 0:
                raise UserError(f"timeouts.{name}={seconds:g} must be > 0 (seconds)")
        if self.placement.cpus_per_bundle <= 0:
            raise UserError("placement.cpus_per_bundle must be > 0")
        self.checkpoint.check()
        if self.rollout.max_restarts < 0:
            raise UserError(
                f"rollout.max_restarts={self.rollout.max_restarts} must be >= 0 (0 = a dead "
                f"actor ends the run)"
            )
        if self.logging.eval_every < 0:
            raise UserError("logging.eval_every must be >= 0")
        self.logging.check()
        self.eval.check(self.data)
        return self


def _check_floats_finite(section: object, prefix: str = "") -> None:
    """NaN passes every `<` check, so look for it (and infinity) explicitly."""
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            _check_floats_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{prefix}{f.name}={value} must be a finite number")


def _check_environment(r: RolloutConfig) -> None:
    if r.agent is not None:
        _check_agent(r)
    if r.environment is None and r.agent is None:
        if r.tools:
            raise UserError(
                f"rollout.tools={sorted(r.tools)} needs rollout.environment (only a multi-turn "
                f"environment calls tools); set one, or remove rollout.tools"
            )
        return
    if r.reward != RolloutConfig.reward:
        key, episodes = ("agent", "agent") if r.agent else ("environment", "environment's run()")
        raise UserError(
            f"rollout.reward={r.reward!r} is not used with rollout.{key}="
            f"{getattr(r, key)!r}: the {episodes} returns each episode's reward; "
            f"remove rollout.reward, or call your reward function from the {key}"
        )
    for name in ("max_turns", "max_episode_tokens", "max_tool_calls", "tool_workers"):
        _positive(r, name, "rollout.")
    for name in ("tool_timeout_s", "tool_memory_mb"):
        if getattr(r, name) <= 0:
            raise UserError(f"rollout.{name}={getattr(r, name)} must be > 0")


def _check_agent(r: RolloutConfig) -> None:
    if r.environment is not None:
        raise UserError(
            f"rollout.agent={r.agent!r} and rollout.environment={r.environment!r} are both set: "
            f"an agent's episodes run in the agent endpoint, their own environment; remove "
            f"one of the two"
        )
    module, _, name = r.agent.partition(":")
    if not module or not name:
        raise UserError(
            f"rollout.agent={r.agent!r} must be written as module:function, e.g. "
            f"examples.agents.echo_agent:agent"
        )
    if r.tools:
        raise UserError(
            f"rollout.tools={sorted(r.tools)} are called by an environment (episode.call_tool), "
            f"never by rollout.agent, which runs its own tools: remove rollout.tools"
        )


def _check_reward_scoring(r: RolloutConfig) -> None:
    if r.reward_workers < 0:
        raise UserError(
            f"rollout.reward_workers={r.reward_workers} must be >= 0 (0 scores rewards in the "
            f"rollout actor itself)"
        )
    if r.reward_timeout_s <= 0:
        raise UserError(f"rollout.reward_timeout_s={r.reward_timeout_s:g} must be > 0 (seconds)")


def _positive(section: object, name: str, prefix: str = "") -> None:
    value = getattr(section, name)
    if value < 1:
        raise UserError(f"{prefix}{name}={value} must be >= 1")
