"""The shared tokenizer and the tools that built and judged HammerLLM's.

`encoding`: the Tokenizer (a Llama-format SentencePiece model, encoded as training did); `hf`: the
HuggingFace files that make transformers encode the same; `train`, `merge`: how tokenizers are made;
`charsets`, `metrics`: how they are judged (character coverage, compression).
"""
from hammer.tokenizer.encoding import (CONFIG_FILE, MODEL_FILE, SPECIAL_TOKENS_FILE, SpecialTokens, Tokenizer,
                                       TokenizerError, sentencepiece_reason)

__all__ = ["CONFIG_FILE", "MODEL_FILE", "SPECIAL_TOKENS_FILE", "SpecialTokens", "Tokenizer", "TokenizerError",
           "sentencepiece_reason"]
