"""The built-in tiny policy: a Qwen3-MoE built in code with its own word-level tokenizer.

Nothing is downloaded. Every process that asks for the built-in model builds it from the same
seed, so trainers and engines start from identical weights without sharing a file system.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from models.tiny_vocabulary import BOS, EOS, PAD, VOCAB, WORDS  # noqa: F401 (re-exported)

# The built-in chat template writes a conversation the way the built-in model reads and writes
# the task: a question, then the answer right after it, closed by <eos> (as the model closes its
# own answers). A system message is closed by <eos> too. No role tokens: new tokens would grow
# the vocabulary, and so change the seeded model every run and test starts from. A lone user
# message renders as its own text, so a plain prompt encodes the same with or without the
# template; the generation prompt adds nothing (the answer starts right after the question).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{{ message['content'] }}"
    "{%- if message['role'] != 'user' %} " + EOS + "{% endif -%}"
    "{%- endfor -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the digits, `=` and three special tokens, with a small chat
    template (`CHAT_TEMPLATE`) so that chat-format prompts run on the built-in model too."""
    vocab = {token: index for index, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=PAD
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int = len(VOCAB)) -> Qwen3MoeConfig:
    """A real Qwen3-MoE architecture (GQA, qk-norm, routed experts), scaled down to ~150k params."""
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=VOCAB.index(PAD),
        eos_token_id=VOCAB.index(EOS),
        bos_token_id=VOCAB.index(BOS),
    )


def fp8_gemm_config() -> Qwen3MoeConfig:
    """The tiny model widened until every projection tiles into 128 x 128 blocks (hidden 256,
    expert width 128, 4 experts; 1.2M params): the smallest Qwen3-MoE whose FP8 checkpoint the
    transformers engine's cuBLAS fp8 GEMM can serve."""
    config = tiny_config()
    config.update(
        {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 128}
        | {"head_dim": 64, "num_experts": 4}
    )
    return config


def build_tiny_model(
    seed: int, dtype: torch.dtype = torch.float32, config: Qwen3MoeConfig | None = None
) -> Qwen3MoeForCausalLM:
    """Random-init tiny Qwen3-MoE (of `config`, the built-in one by default); the same seed
    gives bit-identical weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config or tiny_config())
    return model.to(dtype)


def save_tiny_model(directory: str | Path, seed: int, config: Qwen3MoeConfig | None = None) -> Path:
    """The built-in model of `seed` (float32) and its tokenizer as a Hugging Face directory,
    for the tools and engines that read one (checkpoint converters, SGLang's model path)."""
    build_tiny_model(seed, config=config).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return Path(directory)
