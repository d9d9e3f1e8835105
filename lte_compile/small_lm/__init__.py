"""The project's own small language models (Llama- and GPT-2-style, trained on Shakespeare), their
tokenizer, corpus and the demo. Nothing here is imported by `import lte_compile`.

    from lte_compile.small_lm import load_small_lm, corpus_tokens
"""
from .model import corpus_tokens, load_small_lm

__all__ = ["load_small_lm", "corpus_tokens"]
