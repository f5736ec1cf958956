"""The built-in model's vocabulary, apart from the model so that checking prompts against it
(`actors/preflight.py`, in the dry run too) does not import torch and transformers."""

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
WORDS = [str(d) for d in range(10)] + ["="]
VOCAB = [PAD, EOS, BOS, *WORDS]


def first_unknown_word(text: str) -> str | None:
    """The first whitespace-separated word of `text` that the built-in tokenizer has no token
    for (it would encode as padding), or None when every word is known."""
    known = set(WORDS)
    return next((word for word in text.split() if word not in known), None)
