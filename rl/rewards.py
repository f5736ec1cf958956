"""Reward functions: loading one by its `module:function` path, calling it, and `math_reward`.

The contract of a reward function (named in `rollout.reward`)::

    def my_reward(prompt: str, response: str, label: str) -> float | int | bool:
        ...

- It is named as `module:function`, e.g. `rl.rewards:math_reward`, or `my_rewards:exact_match`
  for a `my_rewards.py` in the job's working directory; the module must import on the machines
  that run the rollout actors.
- It is called once per sample with keyword arguments: `prompt` is the prompt text as in the
  data file (before any chat template), `response` the generated text, `label` the reference
  answer from the data's label column ("" for a row without one).
- It returns a finite number: a float, an int or a bool (True -> 1.0, False -> 0.0). Any other
  type, NaN or infinity stops the run with an error naming the function. So does an exception
  raised inside the function: one `error:` line naming it, its traceback in
  `<output_dir>/error.log`.
- It runs in a reward worker process of the rollout actor (`rl/reward_pool.py`), in that
  process's main thread, each call bounded by `rollout.reward_timeout_s` (past it, or if the
  worker dies, the sample scores 0.0). With `rollout.reward_workers: 0` it runs in the rollout
  actor instead, maybe in a thread other than the main one, where signals (`signal.alarm`) do
  not work, and nothing bounds a call; `math_reward` shows how to bound a slow check either way.
"""

import importlib
import inspect
import logging
import math
import numbers
import threading
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from config.errors import UserError

logger = logging.getLogger(__name__)

RewardFn = Callable[..., float | int | bool]

MATH_TIMEOUT_S = 5
"""Seconds `math_reward` may spend on one parse or comparison (main thread), or on the whole
check (other threads); after that the sample scores 0.0."""


@lru_cache(maxsize=1)
def _targets() -> tuple[tuple, tuple]:
    """(a response's extraction targets, a label's). A response's answer: the last \\boxed{}
    first, then "final answer is" / "answer:" anchors, then the last LaTeX expression or plain
    number (math_verify's own extraction patterns). math_verify (with sympy) is imported on
    first use: a second and a half that the command line and other rewards do not pay."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    response = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    return response, (LatexExtractionConfig(), ExprExtractionConfig())


class _DropTimeoutDisabledWarning(logging.Filter):
    """math_verify warns once that with signals off "you must provide the logic for timeout
    interruption yourself": off the main thread we do (`_with_deadline`), so the line would
    only mislead whoever reads the actor's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def load_reward_fn(path: str) -> RewardFn:
    """Import the reward function named `module:function` (the attribute may be dotted, e.g.
    `module:Class.method`) and check it can take the contract's keyword arguments.
    Raises UserError naming `path` for a malformed path, a module that fails to import, a
    missing attribute, or one that is not a callable of (prompt, response, label)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise UserError(
            f"rollout.reward={path!r} is not of the form module:function (for example "
            f"rl.rewards:math_reward); fix rollout.reward"
        )
    try:
        target = importlib.import_module(module_name)
    except Exception as error:
        raise UserError(
            f"reward function {path}: cannot import module {module_name!r} ({_one_line(error)}); "
            f"make sure it imports from the job's working directory or an installed package"
        ) from error
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise UserError(
                f"reward function {path}: module {module_name!r} has no attribute {attribute!r}; "
                f"check the name after the ':' in rollout.reward"
            )
        target = getattr(target, name)
    if not callable(target):
        raise UserError(
            f"reward function {path} is a {type(target).__name__}, not a function; point "
            f"rollout.reward at a function fn(prompt, response, label) -> float"
        )
    _check_signature(target, path)
    return target


def _check_signature(fn: Callable, path: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some builtins have no introspectable signature; the first call will tell
    try:
        signature.bind(prompt="", response="", label="")
    except TypeError:
        raise UserError(
            f"reward function {path} has signature {signature}; it must accept keyword "
            f"arguments prompt, response and label: def fn(prompt: str, response: str, "
            f"label: str) -> float"
        ) from None


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def compute_reward(fn: RewardFn, path: str, prompt: str, response: str, label: str) -> float:
    """Call a reward function by keyword and check what it returns: a finite real number or a
    bool (-> 0.0 / 1.0). Anything else raises UserError naming `path`, the type and the fix."""
    try:
        value = fn(prompt=prompt, response=response, label=label)
    except Exception as error:
        # The user's code failed: one line naming the function, its error and the sample;
        # the traceback (chained to this error) goes to the run's error.log.
        raise UserError(
            f"reward function {path} raised {_one_line(error)} on a sample of prompt "
            f"{_short(prompt)}; fix the function, or return 0.0 for responses it cannot score"
        ) from error
    if not isinstance(value, numbers.Real | np.bool_):
        raise UserError(
            f"reward function {path} returned {type(value).__name__} {_short(value)}; it must "
            f"return a float, int or bool (convert the score, e.g. return float(score))"
        )
    reward = float(value)
    if not math.isfinite(reward):
        raise UserError(
            f"reward function {path} returned {reward}; it must return a finite number (return "
            f"0.0 for a response it cannot score)"
        )
    return reward


def math_reward(prompt: str, response: str, label: str) -> float:
    """1.0 if the response's final answer is mathematically equal to `label`, else 0.0.

    Built on math_verify: the response's answer is taken from its last \\boxed{}, else an
    "answer is" / "answer:" anchor, else its last expression or number; the label is read as one
    LaTeX expression (so `1/2`, `0.5` and `\\frac{1}{2}` all match each other), and the two are
    compared symbolically and numerically. An empty or unparsable label, or no answer found,
    scores 0.0.

    math_verify bounds its work with `signal.alarm`, which only works in a process's main
    thread. There (a reward worker process) we use it; in any other thread (the rollout
    actor's, with `rollout.reward_workers: 0`; a thread pool) signals are turned off and the
    check runs in a helper thread that we stop waiting for after MATH_TIMEOUT_S: the sample
    scores 0.0 and the abandoned check finishes in the background.
    """
    if not label.strip():
        return 0.0
    if threading.current_thread() is threading.main_thread():
        return _math_equal(response, label, MATH_TIMEOUT_S)
    return _with_deadline(lambda: _math_equal(response, label, None), MATH_TIMEOUT_S, 0.0)


def deepscaler_reward(prompt: str, response: str, label: str) -> float:
    """slime's `--rm-type deepscaler`: `math_reward` of the answer after the model's thinking.

    Only what follows the first `</think>` (or `###Response`) is graded, and it must hold a
    \\boxed{} answer; a response that never closes its thinking (cut off at the length limit)
    scores 0.0, as in DeepScaleR, rather than being graded on a number in its reasoning.
    """
    for marker in ("</think>", "###Response"):
        if marker in response:
            answer = response.split(marker, 1)[1]
            return math_reward(prompt, answer, label) if "\\boxed" in answer else 0.0
    return 0.0


def _math_equal(response: str, label: str, timeout_s: int | None) -> float:
    gold = _parse_label(label, timeout_s)
    if not gold:
        return 0.0
    from math_verify import parse, verify

    answer = parse(response, _targets()[0], parsing_timeout=timeout_s)
    return 1.0 if answer and verify(list(gold), answer, timeout_seconds=timeout_s) else 0.0


@lru_cache(maxsize=4096)
def _parse_label(label: str, timeout_s: int | None) -> tuple:
    """Parse a reference answer once: every sample of a group shares it. A bare label is
    wrapped in $...$ so that math_verify reads it as one expression ("2x+3", not "2")."""
    wrapped = label if "$" in label or "\\boxed" in label else f"${label}$"
    from math_verify import parse

    targets = _targets()[1]
    gold = parse(wrapped, targets, parsing_timeout=timeout_s)
    return tuple(gold or parse(label, targets, parsing_timeout=timeout_s))


def _with_deadline[T](fn: Callable[[], T], timeout_s: float, fallback: T) -> T:
    """Run fn in a daemon thread; return its result, or `fallback` if it takes longer than
    timeout_s (the thread is left to finish on its own: Python cannot kill a thread).
    An exception raised by fn is re-raised here."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as error:
            outcome.append((False, error))

    worker = threading.Thread(target=target, name="reward-deadline", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        logger.warning(
            "reward check took longer than %ss; scoring the sample %s", timeout_s, fallback
        )
        return fallback
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
