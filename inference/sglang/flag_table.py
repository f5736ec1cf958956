"""Writes `server_flags.json`: every server flag of the pinned SGLang, read off its own parser.

The driver validates `--sglang-*` flags (and recipes' `rollout.sglang.server_args`) against this
table, so a dry run or a typo answers in a second on a machine where SGLang is not installed
or takes seconds to import. `tests/test_sglang_flags.py` regenerates the table from the
installed SGLang and fails when it differs, so the file cannot drift from the pin.

    uv run python -m inference.sglang.flag_table        # rewrite the table
"""

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("server_flags.json")


def read_sglang_parser() -> dict[str, Any]:
    """The table, from the installed SGLang's `ServerArgs.add_cli_args`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU-only import warns about CUDA-only kernels
        import sglang
        from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(parser)
    flags = [_describe(action) for action in parser._actions if action.option_strings]
    return {"sglang_version": sglang.__version__, "flags": flags}


def _describe(action: argparse.Action) -> dict[str, Any]:
    names = [s.removeprefix("--") for s in action.option_strings if s.startswith("--")]
    return {
        "names": names,
        "dest": action.dest,
        "arity": _arity(action),
        "type": _type_name(action),
        "choices": sorted(map(str, action.choices)) if action.choices else None,
        "deprecated": type(action).__name__.startswith("Deprecated"),
    }


def _arity(action: argparse.Action) -> str:
    """`switch` (no value), `negatable` (--x / --no-x), `one`, `optional` (0 or 1), `many`."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return "negatable"
    if action.nargs == 0:
        return "switch"
    if action.nargs in ("+", "*"):
        return "many"
    if action.nargs == "?":
        return "optional"
    return "one"


def _type_name(action: argparse.Action) -> str:
    if action.type in (int, float, str):
        return action.type.__name__
    return "str" if action.type is None else "other"


def main() -> None:
    table = read_sglang_parser()
    TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(table['flags'])} flags of sglang {table['sglang_version']} to {TABLE_PATH}")


if __name__ == "__main__":
    main()
