"""Everything about a run that can be known before Ray starts, checked in one pass.

`check_run` reads every input the run names (reward function, or environment or agent, and
tools; model and checkpoint folders, data files, the output folder) and checks the config
against the backends; `check_hardware` checks what the backends need from the machines
(Megatron and NCCL weight sync need GPUs). The driver runs both before it starts a local Ray
cluster, then `check_hardware` again against the shape of the cluster it joined. `driver.py
--dry-run` runs the same pass in planning mode: a model, data or checkpoint path that does not
exist here (a cluster's shared file system is often not mounted where one plans) is reported as
read at launch instead of refused.
"""

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from config.errors import UserError
from config.schema import (
    BUILTIN_MODEL,
    DataConfig,
    SluiceConfig,
    config_json_readable,
)
from data.prompts import PromptRecord
from data.sources import BUILTIN_TASK_MODULES
from models.model_dir import check_checkpoint_dir

LOOP_STATE_FILE = "sluice_state.json"
"""The driver's part of a checkpoint: step, weight version, data position, group ids. A
checkpoint with it resumes a run; one without (a converted model) only gives weights."""

MEGATRON_CPU_SHIM_ENV = "SLUICE_MEGATRON_CPU_SHIM"
"""Set by the test-only shim that runs megatron-core on the CPU (tests/megatron/site)."""


@dataclass
class RunInputs:
    """What the pass read, for the driver to use rather than read again."""

    train: list[PromptRecord] = field(default_factory=list)
    eval_prompts: list[PromptRecord] = field(default_factory=list)
    """The default held-out set (data.eval_data or the built-in task's split)."""
    eval_sets: dict[str, list[PromptRecord]] = field(default_factory=dict)
    """What each evaluation answers, by set name (`data.sources.eval_sets`)."""
    fp8: object = None
    """The rollout checkpoint's fp8 settings (`models.fp8_checkpoint`), None for bf16."""
    loss: object = None
    """`training.loss.LossSettings` resolved for this run."""
    start_from: Path | None = None
    """The checkpoint folder `checkpoint.load` names, if any."""
    resuming: bool = False
    """`start_from` is a saved run (model, optimizer and loop state), not only weights."""
    model_readable: bool = True
    """Planning mode: whether the model's config.json could be read here."""
    notes: list[str] = field(default_factory=list)
    """Planning mode: what was not readable here and is checked at launch."""


def check_run(config: SluiceConfig, planning: bool = False) -> RunInputs:
    """Check the config and every input it names; `UserError` on the first problem."""
    from inference import check_engine_config
    from models.fp8_checkpoint import check_rollout_checkpoint
    from training import check_backend_config
    from training.loss import LossSettings

    config.validate()
    inputs = RunInputs()
    model = config.model.hf_checkpoint
    # Planning, a model that is not here is checked at start-up; one that is, as a run would.
    model_here = (
        model == BUILTIN_MODEL
        or not planning
        or Path(model).exists()
        or config_json_readable(model)
    )
    inputs.model_readable = model_here
    if not model_here:
        inputs.notes.append(
            f"{model}/config.json is not readable here; fp8 or not (and TIS with it) is "
            f"decided from it at start-up"
            + (
                "; the Megatron layout was checked against the world size only, and against "
                "the model's heads, experts and layers at start-up"
                if config.train.backend == "megatron"
                else ""
            )
        )
    check_backend_config(config, model_readable=model_here)
    check_engine_config(config)
    _load_user_code(config)
    if model != BUILTIN_MODEL and model_here:
        check_checkpoint_dir(model)
    inputs.fp8 = check_rollout_checkpoint(config) if model_here else None
    inputs.loss = LossSettings.resolve(config.algorithm, inputs.fp8 is not None)
    load = config.checkpoint.load
    if load and (not planning or Path(load).exists()):
        inputs.start_from = checkpoint_to_load(load)
        inputs.resuming = (inputs.start_from / LOOP_STATE_FILE).is_file()
    elif load:
        inputs.notes.append(f"checkpoint.load={load} is not found here; read at start-up")
    if notice := config.eval.replaced_default(config.data):
        inputs.notes.append(notice)
    missing = [p for p in _data_paths(config) if planning and not Path(p).exists()]
    if missing:
        inputs.notes.append(f"{', '.join(missing)} not found here; read at start-up")
    else:
        from data.sources import eval_sets, load_train_and_eval

        data = _data_to_read(config)
        inputs.train, inputs.eval_prompts = load_train_and_eval(data, config.seed)
        inputs.eval_sets = eval_sets(data, config.eval, inputs.eval_prompts)
        if model == BUILTIN_MODEL:
            held_out = [p for prompts in inputs.eval_sets.values() for p in prompts]
            _check_builtin_vocabulary(inputs.train + held_out)
        elif Path(model).is_dir():
            _check_chat_template(model, inputs)
    _check_folders(config, inputs, planning)
    return inputs


def _load_user_code(config: SluiceConfig) -> None:
    """Import the user's modules here, as the rollout actors will: a bad path or name fails
    before any actor starts, with the key that names it."""
    r = config.rollout
    if r.agent is not None:
        from rl.agent_endpoint import load_agent

        load_agent(r.agent)
    elif r.environment is not None:
        from rl.environments import load_environment

        load_environment(r.environment)
    else:
        from rl.rewards import load_reward_fn

        load_reward_fn(r.reward)
    if r.tools:
        from rl.tools import load_tool_fn

        for name, path in r.tools.items():
            load_tool_fn(name, path)


def _check_folders(config: SluiceConfig, inputs: RunInputs, planning: bool) -> None:
    """The folders the run writes. Planning, a folder on a file system not mounted here (its
    top-level folder is missing, as /checkpoints on a laptop) is checked at start-up, and an
    output folder holding another run is a note: the run itself refuses it."""
    from tracking.run_dir import check_not_another_run, check_writable_folder

    folders = [("checkpoint.save", config.checkpoint.save, "--save DIR")]
    folders.append(("logging.output_dir", config.logging.output_dir, "--logging.output_dir DIR"))
    for key, folder, flag in folders:
        if not folder:
            continue
        if planning and not _mounted_here(Path(folder)):
            inputs.notes.append(f"{key}={folder} is not on a file system mounted here; checked "
                                f"at start-up")  # fmt: skip
            continue
        check_writable_folder(Path(folder), key, flag)
        if key != "logging.output_dir":
            continue
        try:
            check_not_another_run(Path(folder), config.logging.overwrite, inputs.resuming)
        except UserError as refused:
            if not planning:
                raise
            inputs.notes.append(f"the run will refuse it: {refused}")


def _mounted_here(path: Path) -> bool:
    parts = path.absolute().parts
    return len(parts) < 2 or Path(parts[0], parts[1]).exists()


def check_hardware(
    config: SluiceConfig, use_gpus: bool, colocate: bool, model_readable: bool = True
) -> None:
    """Refuse backends the machines cannot run: Megatron without GPUs (megatron-core assumes
    CUDA), a weight transport without the devices it moves weights between, an fp8 checkpoint
    in the transformers engine without GPUs (checked where the model is readable)."""
    from inference import check_fp8_engines
    from placement.transport import transport_backend

    megatron_on_cpu = bool(os.environ.get(MEGATRON_CPU_SHIM_ENV))
    if config.train.backend == "megatron" and not use_gpus and not megatron_on_cpu:
        raise UserError(
            "train.backend=megatron needs NVIDIA GPUs (megatron-core assumes CUDA) and there "
            "is none to place the trainers on; train on the CPU with --train.backend torch, "
            "plan a GPU cluster from here with --dry-run --cluster NODESxGPUS (e.g. 1x8), or "
            "start Ray on GPU nodes"
        )
    transport_backend(config.weight_sync, _Placement(use_gpus, colocate), config.rollout.engine)
    if model_readable:
        check_fp8_engines(config, use_gpus)


@dataclass(frozen=True)
class _Placement:
    """The two facts of a placement plan that `transport_backend` reads."""

    use_gpus: bool
    colocate: bool


def local_use_gpus(config: SluiceConfig) -> bool:
    """Whether a local cluster started on this machine would place actors on GPUs."""
    import torch

    return config.placement.use_gpus != "no" and torch.cuda.device_count() > 0


def checkpoint_to_load(path: str) -> Path:
    """The checkpoint folder `checkpoint.load` names (the newest under a save root)."""
    from training.megatron.checkpoint import latest

    directory = latest(path)
    if directory is None:
        raise UserError(
            f"checkpoint.load={path} holds no checkpoint (no latest_checkpointed_iteration.txt, "
            f"no torch_dist metadata.json, no torch_state.pt); point at a checkpoint.save "
            f"directory, or convert a model with tools/convert_hf_to_torch_dist.py (Megatron)"
        )
    return directory


def _data_to_read(config: SluiceConfig) -> DataConfig:
    """data, less an eval_data that named eval sets replace (it is neither read nor needed)."""
    if config.eval.replaced_default(config.data):
        return replace(config.data, eval_data=None)
    return config.data


def _data_paths(config: SluiceConfig) -> list[str]:
    data = _data_to_read(config)
    paths = [data.prompt_data, data.eval_data, *config.eval.prompt_data.values()]
    return [p for p in paths if p and p not in BUILTIN_TASK_MODULES]


def _check_chat_template(model: str, inputs: RunInputs) -> None:
    """Message-list prompts need the model's chat template; say so before Ray starts rather
    than when the first rollout encodes them."""
    from data.prompts import model_has_chat_template

    held_out = [p for prompts in inputs.eval_sets.values() for p in prompts]
    chat = next((r for r in inputs.train + held_out if r.messages), None)
    if chat is not None and not model_has_chat_template(model):
        raise UserError(
            f"{chat.source}: the prompt is a chat message list but the tokenizer of "
            f"{model} has no chat template (no chat_template in tokenizer_config.json, no "
            f"chat_template.jinja); use a model with a chat template, or give plain-text prompts"
        )


def _check_builtin_vocabulary(prompts: list[PromptRecord]) -> None:
    """The built-in model's tokenizer knows only the digits and '='; anything else would
    silently become padding, and such prompts cannot be learned."""
    from models.tiny_vocabulary import WORDS, first_unknown_word

    for record, text in ((r, t) for r in prompts for t in r.contents()):
        word = first_unknown_word(text)
        if word is not None:
            raise UserError(
                f"{record.source}: the built-in model's tokenizer cannot encode {word!r} in "
                f"prompt {text[:60]!r} (it knows only {' '.join(WORDS)}, separated by "
                f"spaces); use a model with its own tokenizer (--model.hf_checkpoint DIR) or "
                f"write the prompts in that vocabulary"
            )
