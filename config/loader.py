"""Recipe files and overrides -> a validated `SluiceConfig`.

A recipe is a YAML file whose nesting mirrors the dataclasses. Overrides are dotted paths
(`train.lr=1e-4`, or `--train.lr 1e-4` on the command line). Unknown keys are errors that
name the nearest valid key: a mistyped knob must never be silently ignored.
"""

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from config.errors import UserError
from config.schema import SluiceConfig, take_loss_defaults


def load_config(
    recipe: str | Path | None = None, overrides: dict[str, str] | None = None
) -> SluiceConfig:
    """Build the root config from a recipe file (None = all defaults) and dotted overrides."""
    values: dict[str, Any] = {}
    if recipe is not None:
        values = read_recipe(recipe)
    config = from_dict(SluiceConfig, values, where=str(recipe) if recipe else "defaults")
    for dotted, raw in (overrides or {}).items():
        set_dotted(config, dotted, raw)
    # Defaults that depend on another key (GSPO's clip range) fill only what the user left
    # unset: the recipe's keys and the overrides are what the user set.
    take_loss_defaults(config.algorithm, {*given_keys(values), *(overrides or {})})
    return config.validate()


def given_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys a recipe's nested mapping sets (`{"train": {"lr": 1}}` -> `train.lr`);
    a mapping-valued key (`rollout.sglang.server_args`) is listed with its inner keys."""
    keys = []
    for key, value in values.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += given_keys(value, f"{prefix}{key}.")
    return keys


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"recipe {path} is a directory; pass --config with a recipe file, such as one of "
            f"recipes/*.yaml"
        )
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; pass --config with a file from recipes/")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"recipe {path} cannot be read as UTF-8 text: {error}") from None
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path} is not valid YAML: {error}".replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"recipe {path} must be a mapping of sections, got {type(values).__name__}")
    return values


def from_dict(cls: type, values: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from nested `values`, converting and checking every key."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(unknown_key_message(f"{prefix}{key}", where))
        hint = field_types(cls)[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, where, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, hint, f"{prefix}{key}", where)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def set_dotted(config: SluiceConfig, dotted: str, raw: Any, where: str = "command line") -> None:
    """Set `section.field` on `config` from a string (or already-typed) value."""
    value = typed_value(dotted, raw, where)
    *sections, name = dotted.split(".")
    setattr(functools.reduce(getattr, sections, config), name, value)


def typed_value(dotted: str, raw: Any, where: str = "command line") -> Any:
    """`raw` (a command-line string, or a typed value) read as key `dotted`'s type; lets the
    command line compare two spellings of one key before anything is set."""
    hint = key_hint(dotted, where)
    return coerce(parse_override(raw, hint), hint, dotted, where)


def key_hint(dotted: str, where: str = "command line") -> Any:
    """The annotation of settable key `dotted`; UserError if it is unknown or a section."""
    hint: Any = SluiceConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(hint) or part not in field_types(hint):
            raise UserError(unknown_key_message(dotted, where))
        hint = field_types(hint)[part]
    if dataclasses.is_dataclass(hint):
        raise UserError(f"{where}: {dotted} is a section; set one of its fields instead")
    return hint


def parse_override(raw: Any, hint: Any) -> Any:
    """A command-line string as the field's type: text fields keep it verbatim (so `100` or
    `yes` stay text), other fields read it as YAML (`3`, `1e-4`, `true`); `null` is None."""
    if not isinstance(raw, str):
        return raw
    if raw in ("null", "None") and type(None) in typing.get_args(hint):
        return None
    if _is_text(hint):
        return raw
    return yaml.safe_load(raw) if raw != "" else raw


def _is_text(hint: Any) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return len(args) == 1 and _is_text(args[0])
    return hint is str


def all_keys(cls: type = SluiceConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. `train.parallel.tensor`."""
    keys = []
    for name, hint in field_types(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def nearest_keys(dotted: str, also: Iterable[str] = ()) -> list[str]:
    """Valid keys closest to a mistyped one (a bare field name finds its section; a mistyped
    section name finds sections). `also`: more names to offer, e.g. the command line's aliases.

    Spellings are compared first: dashes for underscores (`num-steps` is `num_steps`), a leaf
    name alone (`output-dir` is `logging.output_dir`), an alias with underscores
    (`use_tis` is `use-tis`); then by similarity."""
    keys = all_keys()
    spelled = dotted.replace("-", "_")
    if spelled in keys:
        return [spelled]
    same_leaf = [k for k in keys if "." not in spelled and k.rsplit(".", 1)[-1] == spelled]
    same_alias = [a for a in also if a == dotted.replace("_", "-")]
    if same_leaf or same_alias:
        return [*same_leaf, *same_alias]
    candidates = keys
    if "." not in dotted:
        candidates = sorted({k.rsplit(".", 1)[0] for k in keys})  # sections and top-level keys
    candidates = sorted({*candidates, *also})
    nearest = difflib.get_close_matches(dotted, candidates, n=3, cutoff=0.5)
    if not nearest:
        leaf = spelled.rsplit(".", 1)[-1]
        nearest = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    return nearest


def unknown_key_message(
    dotted: str, where: str, flag_prefix: str = "", also: Iterable[str] = ()
) -> str:
    nearest = [flag_prefix + k for k in nearest_keys(dotted, also)]
    hint = f"; did you mean {' or '.join(nearest)}?" if nearest else ""
    return (
        f"{where}: unknown config key '{flag_prefix}{dotted}'{hint} "
        f"(driver.py --help lists every key)"
    )


def coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `hint`, converting ints to floats where meant."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, where)
    if origin is list:
        if isinstance(value, str):  # the command line's `a,b` (YAML's `[a, b]` is a list)
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise UserError(f"{where}: {key} should be a list, e.g. [a, b] or a,b")
        return [coerce(item, args[0], key, where) for item in value]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"{where}: {key} should be a mapping of names to values")
        return dict(value)
    if origin is typing.Literal:
        if isinstance(value, bool) and {"yes", "no"} <= set(args):
            value = "yes" if value else "no"  # YAML 1.1 reads an unquoted yes/no as a bool
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise UserError(f"{where}: {key}={value!r} is not one of {choices}")
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise UserError(
        f"{where}: {key}={value!r} should be {getattr(hint, '__name__', hint)}, "
        f"not {type(value).__name__}"
    )


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe_keys(cls: type = SluiceConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, docstring) for every settable key, in declaration order."""
    rows = []
    defaults = cls()
    for name, hint in field_types(cls).items():
        if dataclasses.is_dataclass(hint):
            rows += describe_keys(hint, f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", getattr(defaults, name), field_docs(cls).get(name, "")))
    return rows
