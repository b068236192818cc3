"""HammerLLM's tokenizer merge: a base SentencePiece model, plus required characters, plus symbols.

HammerLLM took InternLM-7B's model as the base, appended every character of 《通用规范汉字表》 that it
lacked with the score its own Chinese model gave the character, rescaled to the base's scale by a
calibration ratio, and then added user-defined symbols (markup, digits, punctuation).
"""
from __future__ import annotations

from dataclasses import dataclass

from sentencepiece import sentencepiece_model_pb2

from hammer.errors import HammerError

ModelProto = sentencepiece_model_pb2.ModelProto
_PIECE = ModelProto.SentencePiece


class MergeError(HammerError):
    """Inputs that cannot be merged (no shared calibration characters, a character the second model lacks)."""


@dataclass(frozen=True)
class MergeReport:
    ratio: float
    base_pieces: int
    added_chars: int
    added_symbols: int
    converted_symbols: int
    pieces: int


def parse_model(model_proto: bytes) -> ModelProto:
    proto = ModelProto()
    proto.ParseFromString(model_proto)
    return proto


def calibration_ratio(base: ModelProto, second: ModelProto, chars: list[str]) -> float:
    """Mean over `chars` present in both models of base score / second-model score.

    BPE scores are log-frequency-like ranks on each model's own scale; the ratio puts the second
    model's scores onto the base's, so an added character ranks among the base's pieces as it did in
    the model that learned it.
    """
    base_scores, second_scores = _scores(base), _scores(second)
    ratios = [base_scores[c] / second_scores[c] for c in chars
              if c in base_scores and c in second_scores and second_scores[c] != 0]
    if not ratios:
        raise MergeError(f"none of the {len(chars)} calibration characters is a scored piece of both models")
    return sum(ratios) / len(ratios)


def merge(base: ModelProto, second: ModelProto, required_chars: list[str], symbols: list[str],
          ratio: float) -> tuple[ModelProto, MergeReport]:
    """The base model with the missing `required_chars` and then the `symbols` appended.

    A missing character gets score = its score in `second` x `ratio` (NORMAL piece). A symbol already
    in the model becomes USER_DEFINED with score 0 where it stands; a new one is appended so.
    """
    merged = ModelProto()
    merged.CopyFrom(base)
    index = {p.piece: i for i, p in enumerate(merged.pieces)}
    second_scores = _scores(second)
    added_chars = 0
    for char in dict.fromkeys(required_chars):
        if char in index:
            continue
        if char not in second_scores:
            raise MergeError(f"required character {char!r} (U+{ord(char):04X}) is in neither model, "
                             "so it has no score to calibrate")
        index[char] = _append(merged, char, second_scores[char] * ratio, _PIECE.NORMAL)
        added_chars += 1
    added_symbols = converted = 0
    for symbol in dict.fromkeys(symbols):
        if symbol in index:
            piece = merged.pieces[index[symbol]]
            if piece.type in (_PIECE.CONTROL, _PIECE.UNKNOWN, _PIECE.BYTE):
                raise MergeError(f"symbol {symbol!r} is a {_PIECE.Type.Name(piece.type)} piece of the base "
                                 "and cannot become user-defined")
            piece.type, piece.score = _PIECE.USER_DEFINED, 0.0
            converted += 1
        else:
            index[symbol] = _append(merged, symbol, 0.0, _PIECE.USER_DEFINED)
            added_symbols += 1
    report = MergeReport(ratio=ratio, base_pieces=len(base.pieces), added_chars=added_chars,
                         added_symbols=added_symbols, converted_symbols=converted, pieces=len(merged.pieces))
    return merged, report


def _scores(proto: ModelProto) -> dict[str, float]:
    return {p.piece: p.score for p in proto.pieces if p.type in (_PIECE.NORMAL, _PIECE.USER_DEFINED)}


def _append(proto: ModelProto, piece: str, score: float, kind: int) -> int:
    new = proto.pieces.add()
    new.piece, new.score, new.type = piece, score, kind
    return len(proto.pieces) - 1
