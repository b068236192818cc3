"""HuggingFace tokenizer files for a hammer Tokenizer, written so transformers encodes as hammer does.

transformers' own Llama tokenizers get SentencePiece's encoding wrong in three ways (4.57, 5.17, 5.24):
- it puts a `▁` before every text unless told `add_prefix_space: false`, so a model trained without a
  dummy prefix (HammerLLM's) gets ids it never saw (`"你好 world"` -> `[1, 262, 76379, 2028]`, not
  `[1, 76379, 2028]`);
- it ranks the BPE merges by piece id, not by score, so even with `add_prefix_space: false` runs of
  spaces before `(` split differently (HammerLLM scores `▁(` above `▁▁`, whose id is lower; `"  (Thus"`:
  `▁▁ ( Thus`, not `▁ ▁( Thus`): 438 of 536 mixed
  documents come out right on 5.17, 450 on 4.57's LlamaTokenizerFast, all 536 on 4.57's slow
  LlamaTokenizer (legacy), the tokenizer HammerLLM trained with;
- for a model with a dummy prefix (Llama-2's) its Metaspace pre-tokenizer adds no `▁` to a text that
  already starts with a space, where SentencePiece adds one (`" leading"` -> `[1, 8236]`, not
  `[1, 29871, 8236]`), and 5.x rebuilds LlamaTokenizer from the pieces, ignoring tokenizer.json.
So hammer writes a tokenizer.json that does what SentencePiece does (the dummy prefix as a `Prepend`
normalizer applied once to the whole text, spaces replaced by `▁`, BPE merges ranked by piece score,
byte fallback, user-defined pieces matched whole) and names the generic `PreTrainedTokenizerFast`
class, which transformers 4.x and 5.x (fast and `use_fast=False` alike) load from that file unchanged.
tokenizer.model and the Llama json files are written too, for SentencePiece users and slow tokenizers.

One case stays out of reach of tokenizers' pipeline: a model with a dummy prefix AND user-defined
pieces. tokenizers normalizes each stretch between added tokens apart, so the text after a
user-defined piece gets a `▁` that SentencePiece does not add. Llama-2 has no user-defined pieces and
`hammer tokenizer train` trains without a dummy prefix, as HammerLLM did.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from sentencepiece import sentencepiece_model_pb2

from hammer.fsio import atomic_file

if TYPE_CHECKING:
    from hammer.tokenizer.encoding import Tokenizer

_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
_CONTROL_TYPES = (_PIECE.CONTROL, _PIECE.UNKNOWN)


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def bpe_vocab_and_merges(tok: "Tokenizer", proto) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The pieces as a BPE vocab, and the merges that rebuild each normal piece, best score first.

    SentencePiece merges the adjacent pair whose concatenation has the highest score; listing, for each
    piece, its splits into two pieces, in order of the piece's score, makes HF's rank-ordered BPE
    choose the same merges. Pieces SentencePiece never emits (UNUSED, and a `\\0` piece under byte
    fallback) get a name no text can produce, so that they keep their id without being matched.
    """
    vocab: dict[str, int] = {}
    for i, piece in enumerate(proto.pieces):
        name = piece.piece
        if tok.sp.is_unused(i) or name in vocab:
            name = f"<unused:{i}>"
        vocab[name] = i
    merges: list[tuple[float, int, str, str]] = []
    for i, piece in enumerate(proto.pieces):
        if piece.type != _PIECE.NORMAL or tok.sp.is_unused(i) or len(piece.piece) < 2:
            continue
        text = piece.piece
        splits = [(text[:k], text[k:]) for k in range(1, len(text)) if text[:k] in vocab and text[k:] in vocab]
        for left, right in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]])):
            merges.append((-piece.score, i, left, right))
    merges.sort(key=lambda m: (m[0], m[1]))
    return vocab, [(left, right) for _, _, left, right in merges]


def tokenizer_json(tok: "Tokenizer") -> str:
    """The tokenizers-library serialization of `tok`'s encoding (see the module docstring)."""
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.models import BPE

    proto = tok.proto
    vocab, merges = bpe_vocab_and_merges(tok, proto)
    unk = proto.pieces[tok.unk_id].piece if tok.unk_id is not None else None
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                   byte_fallback=proto.trainer_spec.byte_fallback))
    dummy_prefix = tok.add_dummy_prefix
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if dummy_prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    backend.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                for p in proto.pieces if p.type in _CONTROL_TYPES])
    backend.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                        for p in proto.pieces if p.type == _PIECE.USER_DEFINED])
    prefix = [tok.special.bos_token] if tok.special.add_bos_token else []
    suffix = [tok.special.eos_token] if tok.special.add_eos_token else []
    ids = {t: i for t, i in ((tok.special.bos_token, tok.bos_id), (tok.special.eos_token, tok.eos_id))
           if t is not None and i is not None}
    # A pair is one sequence: BOS only at its start. transformers' own Llama pair template puts a second
    # BOS between the texts, which llama.cpp's converter reads as an unknown separator and warns about.
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(prefix + ["$A"] + suffix),
        pair=" ".join(prefix + ["$A"] + suffix + ["$B:1"] + suffix),
        special_tokens=[(t, ids[t]) for t in dict.fromkeys(prefix + suffix)])
    return backend.to_str(pretty=True)


def hf_files(tok: "Tokenizer") -> dict[str, bytes]:
    """File name -> contents of the HF tokenizer files of `tok`."""
    special = tok.special
    tokens = {key: getattr(special, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    config = {
        # The generic class loads tokenizer.json as written; LlamaTokenizer (5.x) would rebuild it.
        "tokenizer_class": "PreTrainedTokenizerFast",
        # What the model's normalizer does, for readers that do not run tokenizer.json: llama.cpp's
        # converter reads this key, and without it adds SentencePiece's default `▁` before every text.
        "add_prefix_space": tok.add_dummy_prefix,
        "add_bos_token": special.add_bos_token,
        "add_eos_token": special.add_eos_token,
        "clean_up_tokenization_spaces": False,
        **tokens,
        # The control and user-defined pieces by id, as transformers writes its added tokens: llama.cpp's
        # converter reads these types from here, not from tokenizer.model, and without them takes the
        # user-defined pieces SentencePiece keeps whole (HammerLLM's ".", digits, "<p>") for ordinary
        # ones. The unknown piece stays out: listed, the converter would make it a control piece.
        "added_tokens_decoder": {str(i): {**_added_token(p.piece), "special": p.type == _PIECE.CONTROL}
                                 for i, p in enumerate(tok.proto.pieces)
                                 if p.type in (_PIECE.CONTROL, _PIECE.USER_DEFINED)},
    }
    special_map = {k: _added_token(v) for k, v in tokens.items() if v}
    return {
        "tokenizer.model": tok.model_proto,
        "tokenizer.json": tokenizer_json(tok).encode(),
        "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(special_map, indent=2, ensure_ascii=False) + "\n").encode(),
    }


def write_hf_files(tok: "Tokenizer", directory: Path) -> Path:
    """Writes the files into `directory` (created if absent), refusing to replace any existing file."""
    files = hf_files(tok)
    directory.mkdir(parents=True, exist_ok=True)
    taken = [name for name in files if (directory / name).exists()]
    if taken:
        raise FileExistsError(f"{directory} already holds {', '.join(taken)}; refusing to overwrite")
    for name, data in files.items():
        with atomic_file(directory / name, "wb") as f:
            f.write(data)
    return directory
