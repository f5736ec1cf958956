"""Where a run's prompts come from: the built-in task or the user's files."""

from config.schema import BUILTIN_TASK, DataConfig
from data.prompts import PromptRecord, load_prompts


def load_train_and_eval(
    config: DataConfig, seed: int
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(training prompts, held-out prompts); held-out is empty when none are configured."""
    builtin_eval: list[PromptRecord] = []
    if config.prompt_data == BUILTIN_TASK:
        from tasks.digits import make_prompts

        train, builtin_eval = make_prompts(seed)
    else:
        train = load_prompts(config.prompt_data, config.input_key, config.label_key)
    if config.eval_data == BUILTIN_TASK:
        from tasks.digits import make_prompts

        held_out = make_prompts(seed)[1]
    elif config.eval_data is not None:
        held_out = load_prompts(config.eval_data, config.input_key, config.label_key)
    else:
        held_out = builtin_eval
    if config.num_eval_prompts:
        held_out = held_out[: config.num_eval_prompts]
    return train, held_out
