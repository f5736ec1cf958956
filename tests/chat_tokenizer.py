"""A tokenizer that can write anything, for tests of chat-format episodes: byte-level BPE of
one token per byte (code, LaTeX and any text round-trip), with a ChatML chat template as
Qwen's (`<|im_start|>role\ncontent<|im_end|>\n`, `<|im_end|>` its EOS)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
"""ChatML, as Qwen's: every role (`tool` too) as `<|im_start|>role\\ncontent<|im_end|>\\n`."""


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of one token per byte (no merges): it encodes any text and decodes it
    back exactly, code and LaTeX included; `<|im_end|>` is its EOS, as Qwen3's."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
