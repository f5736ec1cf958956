"""The in-process transformers engine: the stand-in for SGLang on CPUs and small GPUs.

Static batching pads prompts on the left and calls `generate` (exact log-probs, any sampling
setting). Continuous batching calls `generate_batch` (paged attention, no padding), whose
log-probs are taken after its logits processors, so it is only offered where those leave the
distribution untouched (top_p = 1, top_k = 0); config validation refuses the rest.
"""

import contextlib

import torch
from transformers import (
    ContinuousBatchingConfig,
    GenerationConfig,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from inference.engine import Completion, InferenceEngine, OnCompletion, SamplingParams
from models.checkpoint_format import checkpoint_tensors
from models.routing import RoutingRecorder, RoutingShape, generation_routing
from weights.checksum import tensor_checksums
from weights.errors import WeightSyncError
from weights.ipc import open_bucket
from weights.manifest import Bucket, check_manifest, plan_specs
from weights.process_group import GroupInfo, init_weights_update_group
from weights.sync import SyncStats, WeightReceiver, _copy_all, _specs_of


class TransformersEngine(InferenceEngine):
    """Generates with a transformers causal LM held in this process."""

    def __init__(
        self,
        model: PreTrainedModel,
        eos_token_id: int,
        pad_token_id: int,
        batching: str = "static",
        max_batch_size: int = 256,
        routing: RoutingShape | None = None,
    ):
        """`routing`: record each completion's experts (routing replay), of this shape."""
        self.model = model.eval()
        self.routing = routing
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self._receiver: WeightReceiver | None = None
        self._destination_tensors: dict[str, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_completion: OnCompletion | None = None,
    ) -> list[Completion]:
        """`on_completion` comes, in this thread, for each static batch of `max_batch_size`
        prompts as soon as that batch is decoded (so the rewards of one batch overlap the
        decoding of the next); with continuous batching, for all of them at the end."""
        if self.batching == "continuous" and not params.greedy:
            completions = self._generate_continuous(prompts, params)
            _report(on_completion, 0, completions)
            return completions
        completions = []
        for start in range(0, len(prompts), self.max_batch_size):
            batch = self._generate_static(prompts[start : start + self.max_batch_size], params)
            _report(on_completion, start, batch)
            completions += batch
        return completions

    def _generate_static(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> list[Completion]:
        input_ids, attention_mask = self._left_pad(prompts)
        stop = [] if self.should_stop is None else [_StopWhen(self.should_stop)]
        recorder = RoutingRecorder(self.model) if self.routing else contextlib.nullcontext()
        with recorder:
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._generation_config(params, output_logits=True),
                stopping_criteria=StoppingCriteriaList(stop),
            )
        responses = output.sequences[:, input_ids.shape[1] :]
        temperature = 1.0 if params.greedy else params.temperature
        # Raw logits (before any processor), tempered: the distribution the trainer scores.
        logits = torch.stack(output.logits, dim=1).float() / temperature
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, responses.unsqueeze(-1))
        completions = [
            self._completion(row.tolist(), lp.squeeze(-1).tolist())
            for row, lp in zip(responses, log_probs, strict=True)
        ]
        if self.routing:
            routed = generation_routing(
                recorder.calls,
                [len(p) for p in prompts],
                [len(c.token_ids) for c in completions],
                input_ids.shape[1],
                self.routing.dtype,
            )
            for completion, experts in zip(completions, routed, strict=True):
                completion.routed_experts = experts
        return completions

    def _generate_continuous(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> list[Completion]:
        outputs = self.model.generate_batch(
            inputs=prompts,
            generation_config=self._generation_config(params),
            continuous_batching_config=ContinuousBatchingConfig(return_logprobs=True),
            progress_bar=False,
        )
        # generate_batch keys results by request id "req_<index>", in submission order.
        ordered = sorted(outputs.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))
        return [self._completion(list(o.generated_tokens), list(o.logprobs)) for o in ordered]

    def _completion(self, tokens: list[int], log_probs: list[float]) -> Completion:
        """Cut after the first EOS (kept: the model must learn to emit it)."""
        if self.eos_token_id in tokens:
            end = tokens.index(self.eos_token_id) + 1
            return Completion(tokens[:end], log_probs[:end], "stop")
        return Completion(tokens, log_probs, "length")

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _generation_config(
        self, params: SamplingParams, output_logits: bool = False
    ) -> GenerationConfig:
        sampling = (
            {}
            if params.greedy
            else {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k or None,
            }
        )
        return GenerationConfig(
            do_sample=not params.greedy,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            output_logits=output_logits,
            return_dict_in_generate=output_logits,
            **sampling,
        )

    # Weight updates: the same verbs as SGLang's endpoints.

    def init_weights_update_group(self, info: GroupInfo, rank_offset: int) -> None:
        group = init_weights_update_group(info, rank_offset)
        self._receiver = WeightReceiver(group, self._destinations())

    def destroy_weights_update_group(self) -> None:
        if self._receiver is not None:
            self._receiver.group.close()
            self._receiver = None

    def check_weights_update(self, plan: list[Bucket]) -> None:
        if self._receiver is not None:
            self._receiver.check(plan)
        else:  # CUDA IPC handles come without a group
            check_manifest(_specs_of(self._destinations()), plan_specs(plan))

    def update_weights_from_distributed(self, plan: list[Bucket], version: int) -> SyncStats:
        stats = self._joined_receiver().receive(plan, version)
        self.weight_version = version
        return stats

    def update_weights_from_tensor(self, handles: list[str], version: int | None) -> None:
        """One bucket by CUDA IPC handle from the training rank on this engine's GPU (colocated):
        its tensors are copied into the model before this returns, since the trainer reuses
        the buffer for the next bucket. `version` comes with the last bucket."""
        if len(handles) != 1:
            raise WeightSyncError(
                f"the transformers engine takes one CUDA IPC handle per bucket, got {len(handles)}"
            )
        (text,) = handles
        names_and_views = open_bucket(text)
        destinations = self._destinations()
        with torch.no_grad():
            _copy_all(
                [destinations[n].data for n, _ in names_and_views], [v for _, v in names_and_views]
            )
        torch.cuda.current_stream(self.device).synchronize()
        if version is not None:
            self.weight_version = version

    def finish_weight_update(self, version: int) -> None:
        self.weight_version = version

    def _destinations(self) -> dict[str, torch.Tensor]:
        """The model's tensors by checkpoint name (computed once: they are updated in place)."""
        if self._destination_tensors is None:
            self._destination_tensors = dict(checkpoint_tensors(self.model))
        return self._destination_tensors

    def _joined_receiver(self) -> WeightReceiver:
        if self._receiver is None:
            raise RuntimeError("weight update before init_weights_update_group")
        return self._receiver

    def weight_checksums(self) -> dict[str, str]:
        return tensor_checksums(checkpoint_tensors(self.model))

    def shutdown(self) -> None:
        self.destroy_weights_update_group()


def _report(on_completion: OnCompletion | None, first: int, completions: list[Completion]) -> None:
    """Hand completions `first`, `first + 1`, ... to the caller's callback, if any."""
    if on_completion is not None:
        for offset, completion in enumerate(completions):
            on_completion(first + offset, completion)


class _StopWhen(StoppingCriteria):
    """Ends every sequence of a `generate` call once `condition()` holds (checked after each
    decoding step): a cancelled generation stops within one step, not at max_new_tokens."""

    def __init__(self, condition):
        self.condition = condition

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.condition(), device=input_ids.device)
