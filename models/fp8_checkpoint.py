"""FP8 rollout checkpoints: reading their `quantization_config`, and which tensors are fp8.

A Hugging Face directory whose `config.json` carries a `quantization_config` is served in fp8:
the trainers keep bf16 weights and every sync quantizes them on their way to the engines, in
the format the config describes. The config is read once and checked field by field; only the
block-wise FP8 format of the published Qwen3 FP8 checkpoints (and DeepSeek-V3, and what
transformers' `FineGrainedFP8Config` writes) is accepted:

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["lm_head", ...]}   # or "ignored_layers"

Anything else (another method or fmt, static activation scales, per-tensor scales, ue8m0
scales, an unknown key) is a `UserError` naming the file and the field, not a guess.

Which tensors are fp8: the `.weight` of every Linear projection of attention (q/k/v/o_proj) and
of the MLP and its experts (gate/up/down_proj), unless its module is listed in
`modules_to_not_convert`. Everything else (embeddings, lm_head, norms, the router `mlp.gate`)
stays in the model's dtype, as in the published checkpoints. Each fp8 weight travels with its
scales under `<name>_scale_inv` (`...q_proj.weight_scale_inv`).
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.errors import UserError
from config.schema import BUILTIN_MODEL, ModelConfig, SluiceConfig

DEFAULT_BLOCK = (128, 128)
"""The block size of DeepSeek-V3's and the Qwen3 FP8 checkpoints (`weights.fp8` uses it too;
kept here so reading a config imports no torch: the dry run stays fast)."""

if TYPE_CHECKING:
    import torch

    from models.safetensors_io import SafetensorsReader

QUANTIZED_PROJECTIONS = (
    *("q_proj", "k_proj", "v_proj", "o_proj"),
    *("gate_proj", "up_proj", "down_proj"),
)
"""The Linear modules whose weights an FP8 checkpoint stores in fp8."""

SCALE_SUFFIX = "_scale_inv"
"""Appended to a weight's name to name its scales (`...weight_scale_inv`)."""

KNOWN_KEYS = {
    "quant_method": "must be fp8",
    "fmt": "must be e4m3 (transformers' FineGrainedFP8 writes none: e4m3 is its only format)",
    "activation_scheme": "must be dynamic",
    "weight_block_size": "two positive integers, e.g. [128, 128]",
    "modules_to_not_convert": "module names kept in the model's dtype",
    "ignored_layers": "the same list under another name",
    "scale_fmt": "must be float (fp32 scales) when given",
    "modules_to_convert": "must be empty: fp8 embeddings are not supported",
    "dequantize": "must be false: a dequantized model is not served in fp8",
}
"""Every key a supported `quantization_config` may have, with what its value must be."""


@dataclass(frozen=True)
class Fp8Format:
    """How an FP8 rollout checkpoint stores its weights (read from its config.json)."""

    block_size: tuple[int, int] = DEFAULT_BLOCK
    """Rows x columns of the blocks that share one scale (`weight_block_size`)."""

    not_converted: tuple[str, ...] = ()
    """Module names or patterns (`*` = one name component) kept in the model's dtype
    (`modules_to_not_convert` / `ignored_layers`), matched on whole dotted components, with or
    without the leading `model.`: `model.layers.0.mlp.gate` does not cover `...mlp.gate_proj`."""

    source: str = ""
    """The config.json it was read from (for messages)."""

    def __post_init__(self):
        # One regex for every pattern: `quantizes` runs per tensor per sync (19k for Qwen3-30B).
        object.__setattr__(self, "_kept", _patterns_regex(self.not_converted))

    def quantizes(self, name: str) -> bool:
        """Whether the tensor `name` (Hugging Face checkpoint name) is stored in fp8."""
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in QUANTIZED_PROJECTIONS:
            return False
        return self._kept is None or self._kept.search(module.removeprefix("model.")) is None

    def to_config(self) -> dict[str, Any]:
        """The `quantization_config` entry of a config.json describing this format."""
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block_size),
            "modules_to_not_convert": list(self.not_converted),
        }


def scale_name(weight_name: str) -> str:
    """`...q_proj.weight` -> `...q_proj.weight_scale_inv`."""
    return weight_name + SCALE_SUFFIX


def read_fp8_format(directory: str | Path) -> Fp8Format | None:
    """The FP8 format of the checkpoint in `directory`, or None when its config.json has no
    `quantization_config` (a bf16/fp32 checkpoint). UserError for an unsupported one."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the model config ({e})") from None
    if not isinstance(config, dict) or config.get("quantization_config") is None:
        return None
    return parse_quantization_config(config["quantization_config"], str(path))


def rollout_fp8_format(model: ModelConfig) -> Fp8Format | None:
    """The FP8 format of the checkpoint the engines serve (`model.hf_checkpoint`); None for a
    bf16 one and for the built-in model."""
    if model.hf_checkpoint == BUILTIN_MODEL:
        return None
    return read_fp8_format(model.hf_checkpoint)


def parse_quantization_config(entry: Any, source: str) -> Fp8Format:
    """Check a `quantization_config` field by field; `source` names the file in errors."""
    where = f"{source}: quantization_config"
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a JSON object, not {type(entry).__name__}")
    _require(entry, "quant_method", "fp8", where, "Sluice serves FP8 (block-wise e4m3) rollouts")
    unknown = sorted(set(entry) - set(KNOWN_KEYS))
    if unknown:
        raise UserError(
            f"{where} has {', '.join(unknown)}, which Sluice does not know how to honour; the "
            f"keys it reads are {', '.join(KNOWN_KEYS)}"
        )
    if "fmt" in entry:
        _require(entry, "fmt", "e4m3", where, "weights are sent as torch.float8_e4m3fn")
    _require(
        entry,
        "activation_scheme",
        "dynamic",
        where,
        "static activation scales come from calibration, which a weight update cannot redo",
    )
    if entry.get("scale_fmt", "float") != "float":
        raise UserError(
            f"{where}.scale_fmt={entry['scale_fmt']!r}: Sluice sends fp32 scales; use a "
            f"checkpoint with scale_fmt float (or none)"
        )
    if entry.get("modules_to_convert"):
        raise UserError(
            f"{where}.modules_to_convert={entry['modules_to_convert']!r}: fp8 embeddings are "
            f"not supported; remove it"
        )
    if entry.get("dequantize"):
        raise UserError(
            f"{where}.dequantize=true asks to load the weights dequantized, not in fp8; remove it"
        )
    return Fp8Format(_block_size(entry, where), _not_converted(entry, where), source)


def _require(entry: dict, key: str, value: str, where: str, why: str) -> None:
    given = entry.get(key)
    if given is None:
        raise UserError(f"{where} has no {key}; it must be {value!r} ({why})")
    if given != value:
        raise UserError(f"{where}.{key}={given!r} is not supported: it must be {value!r} ({why})")


def _block_size(entry: dict, where: str) -> tuple[int, int]:
    block = entry.get("weight_block_size")
    if block is None:
        raise UserError(
            f"{where} has no weight_block_size: per-tensor FP8 scales are not supported; use a "
            f"block-wise checkpoint (weight_block_size [128, 128], e.g. one written by "
            f"tools/convert_hf_to_fp8.py)"
        )
    valid = (
        isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)
    )
    if not valid:
        raise UserError(
            f"{where}.weight_block_size={block!r} must be two positive integers, e.g. [128, 128]"
        )
    return block[0], block[1]


def _not_converted(entry: dict, where: str) -> tuple[str, ...]:
    lists = {k: entry[k] for k in ("modules_to_not_convert", "ignored_layers") if entry.get(k)}
    if len(lists) == 2 and sorted(lists["modules_to_not_convert"]) != sorted(
        lists["ignored_layers"]
    ):
        raise UserError(
            f"{where} has both modules_to_not_convert and ignored_layers, with different "
            f"modules; keep one of them"
        )
    names = next(iter(lists.values()), [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        key = next(iter(lists), "modules_to_not_convert")
        raise UserError(f"{where}.{key} must be a list of module names, got {names!r}")
    return tuple(names)


def _patterns_regex(patterns: tuple[str, ...]) -> "re.Pattern | None":
    """A regex matching a module name (without `model.`) that one of `patterns` names, or
    that lies inside a module one names, on whole dotted components (`*` = one component)."""
    if not patterns:
        return None
    bodies = [
        re.escape(p.removeprefix("model.").strip(".")).replace(r"\*", r"[^.]+") for p in patterns
    ]
    return re.compile(rf"(^|\.)({'|'.join(bodies)})(\.|$)")


SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_experts_per_tok",
    "tie_word_embeddings",
)
"""config.json keys that must agree between an FP8 rollout checkpoint and its bf16 twin."""


def check_rollout_checkpoint(config: SluiceConfig) -> Fp8Format | None:
    """Check the pairing of the rollout checkpoint and the trainers' weights, before any actor
    starts; returns the rollout's FP8 format (None: bf16 rollouts)."""
    model = config.model
    fp8 = rollout_fp8_format(model)
    if fp8 is None:
        if model.train_checkpoint:
            raise UserError(
                f"model.train_checkpoint={model.train_checkpoint} is only for an FP8 "
                f"model.hf_checkpoint (the trainers' bf16 twin of it); {model.hf_checkpoint} is "
                f"not one: remove model.train_checkpoint"
            )
        return None
    if model.train_checkpoint:
        _check_twin(Path(model.hf_checkpoint), Path(model.train_checkpoint))
    elif not (config.train.backend == "megatron" and config.checkpoint.load):
        raise UserError(
            f"model.hf_checkpoint={model.hf_checkpoint} is an FP8 checkpoint: the engines serve "
            f"it, but the trainers need the bf16 weights of the same model: set "
            f"model.train_checkpoint to the bf16 Hugging Face directory, or (train.backend "
            f"megatron) --load a torch_dist checkpoint converted from it with "
            f"tools/convert_hf_to_torch_dist.py"
        )
    return fp8


def _check_twin(fp8_dir: Path, bf16_dir: Path) -> None:
    from transformers import AutoConfig

    where = f"model.train_checkpoint={bf16_dir}"
    if not (bf16_dir / "config.json").is_file():
        raise UserError(f"{where} has no config.json; point it at a bf16 Hugging Face directory")
    twin = AutoConfig.from_pretrained(bf16_dir)
    if getattr(twin, "quantization_config", None) is not None:
        raise UserError(f"{where} is itself a quantized checkpoint; the trainers need the bf16 one")
    rollout = AutoConfig.from_pretrained(fp8_dir)
    differing = [k for k in SHAPE_KEYS if getattr(rollout, k, None) != getattr(twin, k, None)]
    if differing:
        shown = ", ".join(
            f"{k} {getattr(rollout, k, None)!r} vs {getattr(twin, k, None)!r}" for k in differing
        )
        raise UserError(
            f"{where} is not the same model as model.hf_checkpoint={fp8_dir}: {shown} "
            f"(FP8 vs bf16 config)"
        )


def tensor_reader(
    reader: "SafetensorsReader", fp8: Fp8Format | None, dtype: "torch.dtype"
) -> Callable[[str], "torch.Tensor"]:
    """Reads a checkpoint tensor by name in `dtype`; fp8 weights of an FP8 checkpoint come
    back dequantized with their scales."""
    from weights.fp8 import dequantize_blockwise

    def read(name: str) -> "torch.Tensor":
        tensor = reader.read(name)
        if fp8 is None or not fp8.quantizes(name):
            return tensor.to(dtype)
        if tensor.element_size() != 1:
            raise UserError(
                f"{reader.directory}: {name} is stored as {tensor.dtype}, but {fp8.source} "
                f"says it is fp8; the checkpoint and its quantization_config disagree"
            )
        scales = reader.read(scale_name(name))
        return dequantize_blockwise(tensor, scales, fp8.block_size, dtype)

    return read
