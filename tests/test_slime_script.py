"""slime's own launch script for Qwen3-30B-A3B, pasted onto Sluice's command line.

The arrays below are `scripts/run-qwen3-30B-A3B.sh` of THUDM/slime (with MODEL_ARGS from
`scripts/models/qwen3-30B-A3B.sh` and the `train.py` flags of its `ray job submit` line), as
written there; only the paths under /root move to a temp dir that holds what they name (the
model's config.json, the prompt files, the converted checkpoint). What the tests show:
- the whole script (less --wandb-key, refused on purpose) passes `driver.py --config
  recipes/qwen3-30b-a3b-8gpu.yaml --dry-run --cluster 1x8`, and its values land in the keys
  docs/configuration.md names; the seed's FP8 variant (--hf-checkpoint Qwen3-30B-A3B-FP8) and
  24-GPU variant (its SGLANG_ARGS on --cluster 3x8) pass too;
- every flag of the script is honoured or refused, none unknown, and docs/configuration.md's
  table lists each; each refused one (there and in slime's FP8 scripts) fails with one line
  naming it and what to give instead;
- MODEL_ARGS are compared with the checkpoint's config.json: a flag for another model fails.

The dry runs call the driver's `main` in this process (no Ray: `--cluster` plans on a
synthetic cluster), a few seconds each.
"""

import shlex
from pathlib import Path

import pytest
import yaml

import driver
from config.seed_flags import NOT_ALIASED, SEED_FLAGS
from config.slime_script import DERIVED, MODEL_FLAGS, RESTATED
from tests.test_cluster_recipes import write_reference_files

REPO = Path(__file__).resolve().parent.parent
R8 = REPO / "recipes" / "qwen3-30b-a3b-8gpu.yaml"

# slime's scripts/models/qwen3-30B-A3B.sh and scripts/run-qwen3-30B-A3B.sh, array by array,
# comments left out; `$(seq 16 8 256)` is expanded as bash would.
MODEL_ARGS = """
   --disable-bias-linear --qk-layernorm --group-query-attention --num-attention-heads 32
   --num-query-groups 4 --kv-channels 128 --num-layers 48 --hidden-size 2048
   --ffn-hidden-size 6144
   --normalization RMSNorm --position-embedding-type rope --norm-epsilon 1e-6
   --rotary-percent 1.0 --swiglu --untie-embeddings-and-output-weights --vocab-size 151936
   --rotary-base 1000000
   --moe-ffn-hidden-size 768 --moe-router-score-function softmax
   --moe-token-dispatcher-type alltoall --moe-router-topk 8 --moe-layer-freq "'([1]*48)'"
   --num-experts 128 --moe-grouped-gemm --moe-token-drop-policy probs --moe-router-dtype fp32
   --moe-permute-fusion --moe-aux-loss-coeff 0
"""
LAUNCH_ARGS = "--actor-num-nodes 1 --actor-num-gpus-per-node 8 --colocate"
CKPT_ARGS = """
   --hf-checkpoint /root/Qwen3-30B-A3B
   --ref-load /root/Qwen3-30B-A3B_torch_dist
"""
ROLLOUT_ARGS = """
   --prompt-data /root/dapo-math-17k/dapo-math-17k.jsonl
   --input-key prompt --label-key label --apply-chat-template --rollout-shuffle
   --rm-type deepscaler --num-rollout 3000 --rollout-batch-size 8 --n-samples-per-prompt 4
   --rollout-max-response-len 8192 --rollout-temperature 0.8
   --global-batch-size 32 --balance-data
"""
EVAL_ARGS = """
   --eval-prompt-data aime /root/aime-2024/aime-2024.jsonl
   --n-samples-per-eval-prompt 16 --eval-max-response-len 16384 --eval-top-p 0.7
"""
PERF_ARGS = """
   --tensor-model-parallel-size 4 --sequence-parallel --pipeline-model-parallel-size 1
   --context-parallel-size 1 --expert-model-parallel-size 8 --expert-tensor-parallel-size 1
   --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
   --use-dynamic-batch-size --max-tokens-per-gpu 20480
"""
GRPO_ARGS = """
   --advantage-estimator grpo --use-kl-loss --kl-loss-coef 0.00 --kl-loss-type low_var_kl
   --entropy-coef 0.00 --eps-clip 0.2 --eps-clip-high 0.28 --use-tis --tis-level geometric
"""
OPTIMIZER_ARGS = """
   --optimizer adam --lr 1e-6 --lr-decay-style constant --weight-decay 0.1 --adam-beta1 0.9
   --adam-beta2 0.98
   --optimizer-cpu-offload --overlap-cpu-optimizer-d2h-h2d --use-precision-aware-optimizer
"""
WANDB_ARGS = """
   --use-wandb --wandb-project slime-dev --wandb-group qwen3-30B-A3B-TIS
   --wandb-run-id qwen3-30B-A3B-TIS-sequence
"""
WANDB_KEY = "--wandb-key ${WANDB_KEY}"
"""The rest of slime's WANDB_ARGS: refused (the key belongs in the environment)."""
SGLANG_ARGS = """
   --rollout-num-gpus-per-engine 8 --sglang-mem-fraction-static 0.7
   --sglang-cuda-graph-bs 1 2 4 8 $(seq 16 8 256)
"""
MISC_ARGS = """
   --attention-dropout 0.0 --hidden-dropout 0.0 --accumulate-allreduce-grads-in-fp32
   --attention-softmax-in-fp32 --attention-backend flash
"""
SCRIPT = [
    MODEL_ARGS,
    LAUNCH_ARGS,
    CKPT_ARGS,
    ROLLOUT_ARGS,
    EVAL_ARGS,
    PERF_ARGS,
    GRPO_ARGS,
    OPTIMIZER_ARGS,
    WANDB_ARGS,
    SGLANG_ARGS,
    MISC_ARGS,
]

# The seed's variants: bf16 training with fp8 rollouts, and 24 GPUs (three nodes).
FP8_CKPT = "--hf-checkpoint /root/Qwen3-30B-A3B-FP8"
SGLANG_ARGS_24 = """
   --rollout-num-gpus-per-engine 24 --sglang-mem-fraction-static 0.7 --sglang-enable-ep-moe
   --sglang-enable-dp-attention --sglang-dp-size 3 --sglang-moe-dense-tp-size 1
   --sglang-enable-dp-lm-head --sglang-ep-num-redundant-experts 16
"""

# Flags of slime's FP8 scripts (scripts/low_precision/run-qwen3-30b-a3b-fp8.sh,
# scripts/run-qwen3-30B-A3B-fp8-train-infer.sh) beyond the main script's.
FP8_SCRIPT_EXTRA = """
   --ref-load /root/Qwen3-30B-A3B_torch_dist/
   --save /root/Qwen3-30B-A3B_slime/ --save-interval 20
   --rm-type math --eval-interval 20 --rollout-temperature 1 --eval-top-p 1 --bf16
   --sglang-mem-fraction-static 0.6 --sglang-expert-parallel-size 8
"""
FP8_SCRIPT_REFUSED = [
    ("--moe-enable-deepep", "all-to-all"),
    ("--moe-token-dispatcher-type flex", "all-to-all"),
    ("--transformer-impl transformer_engine", "without Transformer Engine"),
    ("--fp8-format e4m3", "--hf-checkpoint"),
    ("--fp8-recipe blockwise", "--hf-checkpoint"),
    ("--use-slime-router", "drop the flag"),
    (
        "--load /root/Qwen3-30B-A3B_slime/ --ref-load /root/Qwen3-30B-A3B_torch_dist/",
        "give --ref-load for the first run",
    ),
]


def words(text: str) -> list[str]:
    """A bash array's words, `$(seq 16 8 256)` expanded."""
    out = []
    for word in shlex.split(text.replace("$(seq 16 8 256)", "SEQ")):
        out += [str(n) for n in range(16, 257, 8)] if word == "SEQ" else [word]
    return out


def flags_of(text: str) -> list[str]:
    return [w for w in words(text) if w.startswith("--")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The script's /root: the model's config.json (and the FP8 one's), prompts, conversion."""
    root = tmp_path_factory.mktemp("root")
    write_reference_files(root, root)
    return root


def pasted(root: Path, *arrays: str) -> list[str]:
    """The arrays' words with /root/ moved to `root`."""
    argv = [w for text in arrays for w in words(text)]
    return [str(root / w.removeprefix("/root/")) if w.startswith("/root/") else w for w in argv]


def recipe_here(root: Path, save: bool = True) -> list[str]:
    """The 8-GPU recipe, with the paths the script does not set moved under `root` (`save`:
    checkpoint.save too, when the script gives no --save)."""
    return [
        *("--config", str(R8)),
        *("--logging.output_dir", str(root / "outputs")),
        *(("--checkpoint.save", str(root / "checkpoints")) if save else ()),
        *("--data.eval_data", str(root / "aime-2024/aime-2024.jsonl")),
    ]


def dry_run(capsys, argv: list[str], cluster: str = "1x8") -> tuple[dict, str, str]:
    """driver.py ARGV --dry-run --cluster CLUSTER: (the printed config, stdout, stderr)."""
    code = driver.main([*argv, "--dry-run", "--cluster", cluster])
    out, err = capsys.readouterr()
    assert code == 0, err
    return yaml.safe_load(out.partition("\n\n")[0]), out, err


def cli_error(capsys, argv: list[str]) -> str:
    assert driver.main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("sluice: note:")]
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_slimes_qwen3_30b_a3b_script_passes_the_dry_run(root, capsys):
    config, out, err = dry_run(capsys, [*recipe_here(root), *pasted(root, *SCRIPT)])
    train, rollout, algorithm = config["train"], config["rollout"], config["algorithm"]
    assert train["num_workers"] == 8 and config["placement"]["colocate"] is True
    parallel = train["parallel"]
    assert (parallel["tensor"], parallel["sequence"], parallel["expert"]) == (4, True, 8)
    assert (train["recompute_granularity"], train["recompute_num_layers"]) == ("full", 1)
    assert train["pack_sequences"] is True and train["max_tokens_per_micro_batch"] == 20480
    assert train["global_batch_size"] == 32 and train["lr"] == 1e-6
    assert (train["weight_decay"], train["adam_beta2"]) == (0.1, 0.98)
    assert train["optimizer_cpu_offload"] and train["use_precision_aware_optimizer"]
    # 8 prompts x 4 samples: slime's --rollout-batch-size counts prompts, ours samples.
    assert (rollout["batch_size"], rollout["samples_per_prompt"]) == (32, 4)
    assert (rollout["max_new_tokens"], rollout["temperature"]) == (8192, 0.8)
    assert rollout["reward"] == "rl.rewards:deepscaler_reward"
    server_args = rollout["sglang"]["server_args"]  # as given; typed when the servers launch
    assert float(server_args["mem-fraction-static"]) == 0.7
    # The script's --sglang-cuda-graph-bs replaces the recipe's cuda-graph-bs-decode.
    assert server_args["cuda-graph-bs"] == [str(n) for n in [1, 2, 4, 8, *range(16, 257, 8)]]
    assert "cuda-graph-bs-decode" not in server_args
    assert (algorithm["clip_low"], algorithm["clip_high"], algorithm["kl_coef"]) == (0.2, 0.28, 0)
    assert (algorithm["tis"], algorithm["tis_level"]) == ("on", "geometric")
    assert algorithm["old_log_probs"] == "recompute"  # slime's TIS ratio: recomputed / rollout
    assert config["checkpoint"]["load"] == str(root / "Qwen3-30B-A3B_torch_dist")
    assert config["num_steps"] == 3000 and config["data"]["shuffle"] is True
    assert config["eval"]["prompt_data"] == {"aime": str(root / "aime-2024/aime-2024.jsonl")}
    assert (config["eval"]["samples_per_prompt"], config["eval"]["top_p"]) == (16, 0.7)
    assert config["logging"]["backends"] == ["tensorboard", "wandb"]
    assert config["logging"]["wandb_run_id"] == "qwen3-30B-A3B-TIS-sequence"
    assert "placement: 8 GPUs on 1 node(s), colocated" in out
    # The flags without a key of their own are named, not silently dropped.
    note = next(line for line in err.splitlines() if "restate what Sluice" in line)
    for flag in ("--balance-data", "--optimizer", "--attention-backend", "--moe-router-dtype"):
        assert flag in note


def test_the_seeds_fp8_and_24_gpu_variants_pass_too(root, capsys):
    fp8, _, _ = dry_run(capsys, [*recipe_here(root), *pasted(root, *SCRIPT, FP8_CKPT)])
    assert fp8["model"]["hf_checkpoint"] == str(root / "Qwen3-30B-A3B-FP8")
    three_nodes = [a for a in SCRIPT if a not in (SGLANG_ARGS, LAUNCH_ARGS)]
    three_nodes += ["--actor-num-nodes 3 --actor-num-gpus-per-node 8 --colocate", SGLANG_ARGS_24]
    config, out, _ = dry_run(capsys, [*recipe_here(root), *pasted(root, *three_nodes)], "3x8")
    assert config["train"]["num_workers"] == 24 and config["rollout"]["gpus_per_engine"] == 24
    assert "placement: 24 GPUs on 3 node(s), colocated" in out


def test_slimes_fp8_scripts_same_flags_pass_and_the_others_are_refused_by_name(root, capsys):
    fp8_script = [a for a in SCRIPT if a != CKPT_ARGS] + [FP8_CKPT, FP8_SCRIPT_EXTRA]
    config, _, _ = dry_run(capsys, [*recipe_here(root, save=False), *pasted(root, *fp8_script)])
    assert config["rollout"]["reward"] == "rl.rewards:math_reward"
    assert config["model"]["dtype"] == "bfloat16" and config["logging"]["eval_every"] == 20
    base = [*recipe_here(root), *pasted(root, *SCRIPT)]
    for extra, instead in FP8_SCRIPT_REFUSED:
        base_here = [w for w in base if "_torch_dist" not in w and w != "--ref-load"]
        line = cli_error(capsys, [*base_here, *pasted(root, extra)])
        assert words(extra)[0] in line and instead in line, line


def test_the_refused_wandb_key_names_the_flag_and_the_way_to_give_the_key(capsys):
    line = cli_error(capsys, words(WANDB_KEY.replace("${WANDB_KEY}", "abc123")))
    assert "--wandb-key" in line and "WANDB_API_KEY" in line and "abc123" not in line


def test_every_flag_of_the_script_is_known_and_in_the_docs_table():
    table = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    known = {*SEED_FLAGS, *RESTATED, *MODEL_FLAGS, *DERIVED}
    every = [f for text in [*SCRIPT, WANDB_KEY] for f in flags_of(text)]
    for flag in every:
        if flag.startswith("--sglang-"):  # passed to SGLang: one row for them all
            assert "\n| `--sglang-FLAG` | `--rollout.sglang.server_args`" in table
            continue
        assert flag in known or flag in NOT_ALIASED, flag
        assert f"\n| `{flag}` | " in table, flag


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--num-layers", "64"),
        ("--num-experts", "64"),
        ("--moe-router-topk", "4"),
        ("--moe-layer-freq", "'([1]*47)'"),
        ("--norm-epsilon", "1e-5"),
        ("--rotary-base", "10000"),
    ],
)
def test_a_model_flag_for_another_model_is_refused_by_name(root, capsys, flag, value):
    argv = [*recipe_here(root), *pasted(root, CKPT_ARGS), flag, value]
    line = cli_error(capsys, argv)
    assert f"{flag} {value} disagrees with" in line and "config.json" in line


def test_a_model_switch_the_checkpoint_lacks_is_refused_by_name(root, capsys):
    argv = [*recipe_here(root), *pasted(root, CKPT_ARGS), "--moe-router-pre-softmax"]
    assert "--moe-router-pre-softmax disagrees with" in cli_error(capsys, argv)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--attention-dropout", "0.1"], "--attention-dropout 0.1 cannot be honoured"),
        (["--optimizer", "sgd"], "--optimizer sgd cannot be honoured"),
        (["--balance-data", "false"], "--balance-data false cannot be honoured"),
        (["--moe-aux-loss-coeff", "0.001"], "--moe-aux-loss-coeff 0.001 cannot be honoured"),
        (["--kl-loss-coef", "0.01"], "--kl-loss-coef 0.01 without --use-kl-loss"),
        (["--rm-type", "dapo"], "'dapo' is not one of the values Sluice has: math, deepscaler"),
        (["--rollout-batch-size", "8", "--rollout.batch_size", "32"], "--rollout-batch-size"),
        (["--actor-num-nodes", "two"], "--actor-num-nodes two should be a whole number"),
    ],
)
def test_a_value_sluice_cannot_honour_is_refused_by_name(capsys, argv, named):
    assert named in cli_error(capsys, argv)


@pytest.mark.parametrize(
    ("argv", "key", "expected"),
    [
        (["--rollout-batch-size", "8", "--n-samples-per-prompt", "4"], "rollout.batch_size", 32),
        (["--rollout-batch-size", "3"], "rollout.batch_size", 24),  # the recipe's 8 samples
        (["--actor-num-gpus-per-node", "4"], "train.num_workers", 4),
        (["--use-kl-loss", "--kl-loss-coef", "0.01"], "algorithm.kl_coef", 0.01),
        (["--kl-loss-type", "kl"], "algorithm.kl_type", "k1"),
        (
            ["--use-tis", "--algorithm.old_log_probs", "rollout", "--use-tis", "false"],
            "algorithm.old_log_probs",
            "rollout",
        ),
    ],
)
def test_a_computed_key_takes_slimes_meaning(argv, key, expected):
    config, _ = driver.parse_args(argv)
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("<think>7 * 6 = 42</think> The answer is \\boxed{42}.", 1.0),
        ("<think>maybe 41</think> so \\boxed{41}", 0.0),
        ("<think>7 * 6 = 42, so the answer is \\boxed{42}", 0.0),  # cut off while thinking
        ("<think>7 * 6 = 42</think> The answer is 42.", 0.0),  # no boxed answer after it
        ("###Response \\boxed{42}", 1.0),
    ],
)
def test_rm_type_deepscaler_grades_the_boxed_answer_after_the_thinking(response, reward):
    from rl.rewards import deepscaler_reward, math_reward

    assert deepscaler_reward(prompt="What is 7 * 6?", response=response, label="42") == reward
    # math_reward (--rm-type math) reads the last number anywhere, thinking included.
    assert math_reward(prompt="", response="<think>7 * 6 = 42", label="42") == 1.0


@pytest.mark.parametrize("flag", sorted(NOT_ALIASED))
def test_every_refused_flag_fails_with_one_line_naming_it(capsys, flag):
    line = cli_error(capsys, [flag, "1"])
    assert f"slime's {flag}" in line, line
