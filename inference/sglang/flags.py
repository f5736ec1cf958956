"""SGLang server flags as users give them: `--sglang-*` on the command line, or
`rollout.sglang.server_args` in a recipe, checked against the pinned SGLang's own flag table.

Every server flag of sglang 0.5.23 is accepted with an `--sglang-` prefix
(`--sglang-mem-fraction-static 0.7` -> `--mem-fraction-static 0.7`). The seed's flags from
older SGLang releases are translated, each with a one-line notice (see `LEGACY_FLAGS` and
`translate`); any other unknown name is an error listing the nearest valid names. Nothing here
imports SGLang: the table (`server_flags.json`, written by `flag_table.py`) answers in
milliseconds on a machine without it.
"""

import difflib
import functools
import json
from dataclasses import dataclass
from typing import Any

from config.errors import UserError
from inference.sglang.flag_table import TABLE_PATH

CLI_PREFIX = "--sglang-"


@dataclass(frozen=True)
class ServerFlag:
    """One flag of the pinned SGLang's `launch_server` parser."""

    name: str
    """Canonical spelling, without dashes (the parser's first long option)."""
    aliases: tuple[str, ...]
    arity: str
    """`switch`, `negatable`, `one`, `optional` or `many` (see flag_table._arity)."""
    type: str
    """`int`, `float`, `str` or `other` (parsed by SGLang itself)."""
    choices: tuple[str, ...] | None
    deprecated: bool


# Flags of the SGLang the seed was written for, gone from 0.5.23; `translate` rewrites them.
LEGACY_FLAGS: dict[str, str] = {"enable-ep-moe": "switch", "cuda-graph-bs": "many"}


# The seed's spellings and the 0.5.23 flags they become (`launch._translate_seed_flags`).
SEED_SPELLINGS: dict[str, tuple[str, ...]] = {
    "enable-ep-moe": ("ep-size",),
    "cuda-graph-bs": ("cuda-graph-bs-decode",),
    "enable-dp-attention": ("attn-dp-size",),
    "dp-size": ("attn-dp-size",),
}


def over_recipe(recipe: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The command line's server flags on top of a recipe's server_args: a flag replaces the
    recipe's entry under either spelling (a seed array's --sglang-cuda-graph-bs replaces the
    recipe's cuda-graph-bs-decode), so that pasting the seed's array never reads as giving one
    setting twice."""
    replaced = set(given)
    for name in given:
        replaced.update(SEED_SPELLINGS.get(name, ()))
        replaced.update(old for old, new in SEED_SPELLINGS.items() if name in new)
    return {**{k: v for k, v in recipe.items() if k not in replaced}, **given}


@functools.cache
def server_flags() -> dict[str, ServerFlag]:
    """Every flag by each of its spellings (canonical name and aliases)."""
    table = json.loads(TABLE_PATH.read_text(encoding="utf-8"))
    by_name: dict[str, ServerFlag] = {}
    for row in table["flags"]:
        names = row["names"]
        if row["arity"] == "negatable":
            names = [n for n in names if not n.startswith("no-")]
        flag = ServerFlag(
            name=names[0],
            aliases=tuple(names[1:]),
            arity=row["arity"],
            type=row["type"],
            choices=tuple(row["choices"]) if row["choices"] else None,
            deprecated=row["deprecated"],
        )
        for name in names:
            by_name[name] = flag
    return by_name


@functools.cache
def sglang_version() -> str:
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))["sglang_version"]


def canonical_name(name: str, where: str) -> str:
    """A user's spelling (dashes or underscores, any alias) -> the canonical flag name."""
    spelled = name.removeprefix("--").replace("_", "-")
    if spelled in LEGACY_FLAGS:
        return spelled
    flag = server_flags().get(spelled)
    if flag is None:
        raise UserError(unknown_flag_message(spelled, where))
    return flag.name


def unknown_flag_message(spelled: str, where: str) -> str:
    names = sorted({*server_flags(), *LEGACY_FLAGS})
    nearest = difflib.get_close_matches(spelled, names, n=4, cutoff=0.6)
    if not nearest:  # a word of the flag, e.g. `redundant`, finds the flags that contain it
        words = [w for w in spelled.split("-") if len(w) > 3]
        nearest = [n for n in names if any(w in n for w in words)][:4]
    hint = f"; nearest: {', '.join(CLI_PREFIX + n for n in nearest)}" if nearest else ""
    return (
        f"{where}: {CLI_PREFIX}{spelled} is not a server flag of sglang {sglang_version()}{hint} "
        f"(`python -m sglang.launch_server --help` lists them)"
    )


def split_cli_flags(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Take every `--sglang-NAME [values]` out of a command line.

    Returns the remaining arguments and {canonical name: value}: True for a switch, a string
    for a one-value flag, a list of strings for a many-value flag. A flag given twice keeps
    its last value, as argparse does. Values are typed later, against the table.
    """
    rest: list[str] = []
    given: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith(CLI_PREFIX):
            rest.append(token)
            i += 1
            continue
        spelled, has_inline, inline = token[len(CLI_PREFIX) :].partition("=")
        where = f"command line {CLI_PREFIX}{spelled}"
        negated = _negated(spelled)
        if negated and not has_inline:  # --sglang-no-X of a --X / --no-X pair
            given[negated] = False
            i += 1
            continue
        name = canonical_name(spelled, "command line")
        arity = LEGACY_FLAGS.get(name) or server_flags()[name].arity
        given[name], i = _take_values(argv, i + 1, arity, inline if has_inline else None, where)
    return rest, given


def _negated(spelled: str) -> str | None:
    """The flag `no-X` switches off, when X is a negatable flag."""
    flag = server_flags().get(spelled.removeprefix("no-").replace("_", "-"))
    if spelled.startswith("no-") and flag is not None and flag.arity == "negatable":
        return flag.name
    return None


def _take_values(argv: list[str], i: int, arity: str, inline: str | None, where: str):
    """(value, index of the next argument) for a flag whose values start at argv[i]."""
    end = i
    while end < len(argv) and not argv[end].startswith("--") and (arity == "many" or end == i):
        end += 1
    following = argv[i:end]
    if arity in ("switch", "negatable"):
        spelled = inline if inline is not None else (following[0] if following else None)
        if spelled is not None and spelled.lower() in ("true", "false"):
            return spelled.lower() == "true", i if inline is not None else i + 1
        if inline is not None:
            raise UserError(f"{where} is a switch: give it alone, or =true / =false")
        return True, i
    if inline is not None:
        return ([inline] if arity == "many" else inline), i
    if not following:
        if arity == "optional":
            return True, i
        raise UserError(f"{where} needs a value")
    return (following if arity == "many" else following[0]), end


def check_value(name: str, value: Any, where: str) -> None:
    """Refuse a value SGLang's parser would refuse (wrong arity, type or choice)."""
    if name in LEGACY_FLAGS:
        return
    flag = server_flags()[name]
    label = f"{where}: {CLI_PREFIX}{name}"
    if flag.arity in ("switch", "negatable"):
        if not isinstance(value, bool):
            raise UserError(f"{label} is a switch: give true or false, not {value!r}")
        if flag.arity == "switch" and not value:
            return
        return
    items = value if isinstance(value, list) else [value]
    if flag.arity != "many" and isinstance(value, list):
        raise UserError(f"{label} takes one value, not the list {value!r}")
    if not items:
        raise UserError(f"{label} needs at least one value")
    for item in items:
        _check_item(flag, item, label)


def _check_item(flag: ServerFlag, item: Any, label: str) -> None:
    if isinstance(item, bool | dict | list):
        raise UserError(f"{label}: {item!r} is not a {flag.type} value")
    text = str(item)
    if flag.type in ("int", "float"):
        try:
            int(text) if flag.type == "int" else float(text)
        except ValueError:
            raise UserError(f"{label}: {text!r} is not an {flag.type}") from None
    if flag.choices and text not in flag.choices:
        raise UserError(f"{label}: {text!r} is not one of {', '.join(flag.choices)}")


def normalize(server_args: dict[str, Any], where: str) -> dict[str, Any]:
    """Recipe or command-line flags -> {canonical name: value}, every name and value checked."""
    normalized: dict[str, Any] = {}
    for spelled, value in server_args.items():
        name = canonical_name(str(spelled), where)
        if name in normalized:
            raise UserError(f"{where}: {CLI_PREFIX}{name} is given twice (as {spelled!r} too)")
        check_value(name, value, where)
        normalized[name] = value
    return normalized


def as_argv(args: dict[str, Any]) -> list[str]:
    """{canonical name: value} -> `launch_server` arguments (a false switch is left out)."""
    argv: list[str] = []
    for name, value in args.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is False:
            if server_flags()[name].arity == "negatable":
                argv.append(f"--no-{name}")
        elif isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv
