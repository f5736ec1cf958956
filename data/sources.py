"""Where a run's prompts come from: the built-in task or the user's files."""

import importlib

from config.schema import BUILTIN_TASK, BUILTIN_TOOL_TASK, DataConfig, EvalConfig
from data.prompts import PromptRecord, check_chat_settings, load_prompts

BUILTIN_TASK_MODULES = {BUILTIN_TASK: "tasks.digits", BUILTIN_TOOL_TASK: "tasks.lookup"}
"""Each built-in task's module: its `make_prompts(seed) -> (train, held_out)`."""


def builtin_prompts(name: str, seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    return importlib.import_module(BUILTIN_TASK_MODULES[name]).make_prompts(seed)


def load_train_and_eval(
    config: DataConfig, seed: int
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(training prompts, held-out prompts); held-out is empty when none are configured."""
    builtin_eval: list[PromptRecord] = []
    if config.prompt_data in BUILTIN_TASK_MODULES:
        train, builtin_eval = builtin_prompts(config.prompt_data, seed)
    else:
        train = load_prompts(config.prompt_data, config.input_key, config.label_key)
    if config.eval_data in BUILTIN_TASK_MODULES:
        held_out = builtin_prompts(config.eval_data, seed)[1]
    elif config.eval_data is not None:
        held_out = load_prompts(config.eval_data, config.input_key, config.label_key)
    else:
        held_out = builtin_eval
    if config.num_eval_prompts:
        held_out = held_out[: config.num_eval_prompts]
    check_chat_settings(train + held_out, config.apply_chat_template, config.chat_template_kwargs)
    return train, held_out


def eval_sets(
    data: DataConfig, evaluation: EvalConfig, held_out: list[PromptRecord]
) -> dict[str, list[PromptRecord]]:
    """The held-out sets an evaluation answers, by name: eval.prompt_data's, else `held_out`
    (data.eval_data or the built-in split) as the set `held_out`; none when that is empty."""
    if not evaluation.prompt_data:
        return {"held_out": held_out} if held_out else {}
    limit = data.num_eval_prompts or None
    sets = {
        name: load_prompts(path, data.input_key, data.label_key)[:limit]
        for name, path in evaluation.prompt_data.items()
    }
    for prompts in sets.values():
        check_chat_settings(prompts, data.apply_chat_template, data.chat_template_kwargs)
    return sets
