"""Write docs/configuration.md from the typed config, so the reference cannot drift from it.

    uv run python tools/config_reference.py           # print the markdown
    uv run python tools/config_reference.py --write   # (re)write docs/configuration.md
    uv run python tools/config_reference.py --check   # exit 1 if docs/configuration.md is stale

Every key, default and description comes from `config.loader.describe_keys()` (the field
docstrings of `config/schema.py`), and the slime flag names from `config.seed_flags`; the only
text kept here is the page's introduction. `tests/test_docs.py` fails when the page on disk is
not what this prints.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import yaml

from config.loader import describe_keys, field_docs
from config.schema import SluiceConfig
from config.seed_flags import NOT_ALIASED, SEED_FLAGS, SeedFlag
from config.slime_script import DERIVED, MODEL_FLAGS, RESTATED

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGE = REPO_ROOT / "docs" / "configuration.md"
REGENERATE = "uv run python tools/config_reference.py --write"

INTRO = """\
A run is a recipe: a YAML file whose sections mirror the typed config classes in
`config/schema.py` (one dataclass per component, every field documented). `recipes/tiny.yaml`
is the default. Any key can be overridden on the command line with its dotted name:

```bash
uv run driver.py --config recipes/tiny.yaml --train.lr 3e-3 --num_steps 40 --rollout.num_engines 1
uv run driver.py --help                  # every key, its default and its meaning
uv run driver.py --dry-run               # the resolved config and the placement plan, then exit
uv run driver.py --dry-run --cluster 3x8 --train.num_workers 16 --rollout.num_engines 8
```

The config is validated once, before anything starts. A mistake is one line on stderr and exit
code 2, naming the field, file or line and the fix: an unknown key (with the nearest valid
names), a wrong type, a batch size that is not a multiple of the group size, a prompt file that
is missing or has a row without the input key, a reward function that does not import or
returns a non-number, a placement that does not fit the cluster.

In a recipe, write a key inside its section (`train:` then `lr: 0.002`); on the command line,
as `--train.lr 0.002`. The defaults below are written as YAML, as a recipe would spell them.
SGLang's own server flags are not config keys: they pass through with a `--sglang-` prefix or
`rollout.sglang.server_args` ([the SGLang engine](sglang.md)).
"""

SLIME_INTRO = """\
The driver also accepts slime's (Megatron-LM's) spellings, so the seed's argument arrays can be
pasted as they are: `--tensor-model-parallel-size 4 --sequence-parallel
--expert-model-parallel-size 8 --optimizer-cpu-offload --lr 1e-6 --hf-checkpoint DIR --load DIR
--save DIR --save-interval 20 ...`. Each is an alias of one config key (`--advantage-estimator`
sets the loss or the advantage its value names); `driver.py --help` lists them under
"Megatron / slime flag names". Switches take no value (or `true`/`false`). A flag and its
dotted key given with different values is an error, not a silent choice. slime's `--seed` is
our top-level key `seed`, the same flag.

slime's own `scripts/run-qwen3-30B-A3B.sh` passes as it is (its MODEL_ARGS, CKPT_ARGS,
ROLLOUT_ARGS, EVAL_ARGS, PERF_ARGS, GRPO_ARGS, OPTIMIZER_ARGS, WANDB_ARGS, SGLANG_ARGS,
MISC_ARGS and `--actor-num-nodes 1 --actor-num-gpus-per-node 8 --colocate`) on top of
`--config recipes/qwen3-30b-a3b-8gpu.yaml`, which supplies what slime's flags do not say (the
Megatron backend, SGLang, bf16, where outputs go); only `--wandb-key` is refused, on purpose.
`tests/test_slime_script.py` holds the script and runs it through `driver.py --dry-run
--cluster 1x8`, with the seed's FP8 and 24-GPU variants. Every flag of that script is in one of
the tables below: an alias of one key; a flag whose key is computed; a flag for what Sluice
always does; a model architecture flag, checked against the checkpoint; or refused, with what
to give instead.
"""

RESTATED_INTRO = """\
Flags for what Sluice always does, one way: accepted with the value that says so (the run's
first lines name them: `sluice: note: slime flags that restate what Sluice always does: ...`),
refused with any other value, since that setting cannot be changed here.
"""

MODEL_INTRO = """\
slime's MODEL_ARGS (Megatron-LM's architecture flags) are not settings here: Sluice builds the
model from the checkpoint's config.json (`--hf-checkpoint`). Each one given is compared with
that file where it is readable (the dry run's machine, and always where the run starts), and
one that disagrees is an error naming it, since a script written for another model would
otherwise train this one silently. `--moe-grouped-gemm` is an alias (above).
"""


def render() -> str:
    """The whole page, as `--write` stores it."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from config/schema.py and config/seed_flags.py; do not edit by hand. "
        f"Regenerate: {REGENERATE} -->",
        "",
        INTRO,
    ]
    for section, rows in sections().items():
        lines += [f"## {section_title(section)}", "", "| key | default | description |"]
        lines.append("| --- | --- | --- |")
        lines += [
            f"| `{key}` | {default_cell(default)} | {cell(doc)} |" for key, default, doc in rows
        ]
        lines.append("")
    lines += ["## Megatron / slime flag names", "", SLIME_INTRO]
    lines += ["| flag | sets |", "| --- | --- |"]
    lines += [f"| `{flag}` | {cell(alias_meaning(alias))} |" for flag, alias in SEED_FLAGS.items()]
    lines.append(
        "| `--sglang-FLAG` | `--rollout.sglang.server_args` (any sglang.launch_server flag; the "
        "seed's older names translated, see [the SGLang engine](sglang.md)) |"
    )
    lines += ["", "### slime flags whose key is computed", ""]
    lines += ["| flag | sets |", "| --- | --- |"]
    lines += [f"| `{flag}` | {cell(doc)} |" for flag, (_, doc) in DERIVED.items()]
    lines += ["", "### slime flags for what Sluice always does", "", RESTATED_INTRO]
    lines += ["| flag | accepted | what Sluice does |", "| --- | --- | --- |"]
    lines += [
        f"| `{flag}` | {', '.join(f'`{v}`' for v in r.accepts)} | {cell(r.does)} |"
        for flag, r in RESTATED.items()
    ]
    lines += ["", "### slime's model architecture flags (MODEL_ARGS)", "", MODEL_INTRO]
    lines += ["| flag | compared with config.json's |", "| --- | --- |"]
    lines += [f"| `{flag}` | {cell(field)} |" for flag, field in MODEL_FLAGS.items()]
    lines += ["", "### slime flags refused", ""]
    lines += ["| flag | refused: why, and what to give instead |", "| --- | --- |"]
    lines += [f"| `{flag}` | {cell(reason)} |" for flag, reason in NOT_ALIASED.items()]
    return "\n".join(lines) + "\n"


def sections() -> dict[str, list[tuple[str, Any, str]]]:
    """describe_keys() rows grouped by their first dotted component, in declaration order;
    the top-level scalars (num_steps, seed) under ''."""
    grouped: dict[str, list[tuple[str, Any, str]]] = {}
    for key, default, doc in describe_keys():
        section = key.split(".", 1)[0] if "." in key else ""
        grouped.setdefault(section, []).append((key, default, doc))
    return grouped


def section_title(section: str) -> str:
    if not section:
        return "Top level"
    return f"`{section}`: {field_docs(SluiceConfig)[section].rstrip('.')}"


def default_cell(value: Any) -> str:
    """A default as a recipe writes it (YAML: `null`, `true`, a quoted `'on'`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("...").strip()
    return f"`{text}`"


def cell(text: str) -> str:
    """Text inside a table cell: a `|` would end the cell."""
    return text.replace("|", "\\|")


def alias_meaning(alias: SeedFlag) -> str:
    if alias.keyed_values:
        return "; ".join(f"`{value}`: `--{key} {kv}`" for value, key, kv in alias.keyed_values)
    if alias.values:
        pairs = "; ".join(f"`{value}`: `{kv}`" for value, kv in alias.values)
        return f"`--{alias.key}` (switch; {pairs})"
    if alias.switch:
        return f"`--{alias.key}` (switch)"
    return f"`--{alias.key}`"


def stale_message() -> str | None:
    """None when docs/configuration.md is current, else a one-line reason with the fix."""
    if not PAGE.is_file():
        return f"{PAGE.relative_to(REPO_ROOT)} is missing; run `{REGENERATE}`"
    if PAGE.read_text(encoding="utf-8") != render():
        return (
            f"{PAGE.relative_to(REPO_ROOT)} is out of date with config/schema.py; "
            f"run `{REGENERATE}`"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/config_reference.py",
        description="Print the configuration reference (docs/configuration.md) generated "
        "from config/schema.py.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write docs/configuration.md")
    mode.add_argument(
        "--check", action="store_true", help="exit 1 if docs/configuration.md is stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        if message := stale_message():
            print(f"error: {message}", file=sys.stderr)
            return 1
        return 0
    if args.write:
        PAGE.parent.mkdir(exist_ok=True)
        PAGE.write_text(render(), encoding="utf-8")
        print(f"wrote {PAGE.relative_to(REPO_ROOT)}")
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
