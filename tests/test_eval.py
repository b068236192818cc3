"""The eval harness: Skywork-style truncation, NLL over positions 2..n, domain loss, normalization,
bits per byte, length batches; the HF scorer against a hand loop with transformers; `hammer eval`."""
import json
import math

import numpy as np
import pytest
import sentencepiece as spm

from hammer import eval as harness
from hammer.cli import main
from hammer.documents import DocumentError, read_documents
from hammer.tokenizer import Tokenizer
from tests.eval_fixtures import TEXTS, write_domain_files, write_model_dir


class IdScorer:
    """NLL of each target is 1 + id/1000: sums are known by hand and a shifted target shows."""

    def __init__(self, max_length=10_000, fixed_shapes=False):
        self.max_length, self.fixed_shapes = max_length, fixed_shapes
        self.calls = []

    def token_nll(self, input_ids):
        self.calls.append(input_ids.shape)
        return 1.0 + input_ids[:, 1:] / 1000.0


def expected_nll(id_lists):
    return sum(sum(1.0 + i / 1000.0 for i in ids[1:]) for ids in id_lists)


def bytes_after_the_first_token(tokenizer, text):
    """The text's UTF-8 bytes less those its first token decodes to (a text piece, no dummy prefix)."""
    first = tokenizer.encode(text, add_special_tokens=False)[0]
    assert not tokenizer.sp.is_byte(first)
    return len(text.encode()) - len(tokenizer.decode([first]).encode())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory):
    return write_domain_files(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_scorer(tiny_model_dir):
    from hammer_torch.scorer import TorchScorer

    return TorchScorer.from_hf(tiny_model_dir)


def test_harness_nll_equals_a_loop_over_positions_with_transformers(tiny_model_dir, tokenizer, hf_scorer):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    docs = TEXTS + ["A", "天"]
    max_tokens = 150  # 50 characters: some documents are cut
    by_hand, scored = 0.0, 0
    with torch.no_grad():
        for text in docs:
            ids = tokenizer.encode(text[:50], add_special_tokens=False)
            for t in range(1, len(ids)):
                logits = model(torch.tensor([ids[:t]])).logits[0, -1]
                by_hand -= torch.log_softmax(logits.double(), -1)[ids[t]].item()
                scored += 1
    result = harness.evaluate(hf_scorer, tokenizer, {"mixed": docs}, max_tokens=max_tokens, batch_size=4)
    d = result["mixed"]
    assert d.scored_tokens == scored
    assert d.nll == pytest.approx(by_hand, rel=1e-5)
    assert d.loss == pytest.approx(by_hand / scored, rel=1e-5)
    assert d.ppl == pytest.approx(math.exp(by_hand / scored), rel=1e-5)
    assert result.average_ppl == pytest.approx(d.ppl, rel=1e-12)
    # Random weights spread over 401 ids: the loss must be near log(401), not near zero.
    assert 3.0 < d.loss < 12.0


def test_padding_and_batch_size_do_not_change_the_losses(tokenizer, hf_scorer):
    docs = TEXTS * 2 + ["short one", "北京"]
    losses = [harness.evaluate(hf_scorer, tokenizer, {"d": docs}, batch_size=b)["d"].nll for b in (1, 3, 8)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_documents_are_cut_to_a_third_of_max_tokens_in_characters_before_tokenizing(tokenizer):
    docs = [TEXTS[0], TEXTS[2], TEXTS[4]]
    d = harness.evaluate(IdScorer(), tokenizer, {"d": docs}, max_tokens=31)["d"]  # 10 characters
    ids = [tokenizer.encode(t[:10], add_special_tokens=False) for t in docs]
    assert d.documents == 3
    assert d.scored_tokens == sum(len(i) - 1 for i in ids)
    assert d.nll == pytest.approx(expected_nll(ids), rel=1e-12)
    assert d.bytes == sum(bytes_after_the_first_token(tokenizer, t[:10]) for t in docs)
    assert d.truncated_documents == 0


def test_the_first_token_is_never_scored_and_one_token_documents_count_for_nothing(tokenizer):
    assert len(tokenizer.encode("A", add_special_tokens=False)) == 1
    one = harness.evaluate(IdScorer(), tokenizer, {"d": [TEXTS[1]]})["d"]
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    assert one.scored_tokens == len(ids) - 1
    assert one.nll == pytest.approx(expected_nll([ids]), rel=1e-12)
    with_singles = harness.evaluate(IdScorer(), tokenizer, {"d": [TEXTS[1], "A", ""]})["d"]
    assert (with_singles.scored_tokens, with_singles.nll) == (one.scored_tokens, one.nll)
    assert with_singles.documents == 3
    with pytest.raises(harness.EvalError, match="no document has two tokens"):
        harness.evaluate(IdScorer(), tokenizer, {"d": ["A", ""]})


def test_ids_are_cut_at_max_tokens_and_at_the_model_context(tokenizer):
    text = "𝔘𝔘𝔘𝔘𝔘𝔘"  # outside the vocabulary: four byte pieces a character
    assert len(tokenizer.encode(text[:4], add_special_tokens=False)) == 16
    d = harness.evaluate(IdScorer(), tokenizer, {"d": [text]}, max_tokens=12)["d"]  # 4 characters
    assert (d.scored_tokens, d.truncated_documents, d.bytes) == (11, 1, 11)  # 3 characters less the first byte
    short_context = IdScorer(max_length=9)
    d = harness.evaluate(short_context, tokenizer, {"d": [text, "ab"]}, max_tokens=12)["d"]
    assert d.scored_tokens == 8 + len(tokenizer.encode("ab", add_special_tokens=False)) - 1
    # Ids 2..9 of the cut document are 8 byte pieces (the ninth a first byte, scored and counted).
    assert d.bytes == 8 + bytes_after_the_first_token(tokenizer, "ab")
    assert max(shape[1] for shape in short_context.calls) <= 9


def test_average_is_exp_of_the_mean_domain_loss_and_bits_per_byte_follow_the_nll(tokenizer):
    result = harness.evaluate(IdScorer(), tokenizer, {"en": TEXTS[:2], "zh": TEXTS[2:4]})
    en, zh = result["en"], result["zh"]
    assert result.average_ppl == pytest.approx(math.exp((en.loss + zh.loss) / 2), rel=1e-12)
    assert result.average_ppl != pytest.approx(math.exp((en.nll + zh.nll) / (en.scored_tokens + zh.scored_tokens)))
    for d, texts in ((en, TEXTS[:2]), (zh, TEXTS[2:4])):
        assert d.bytes == sum(bytes_after_the_first_token(tokenizer, t) for t in texts)
        assert d.bits_per_byte == pytest.approx(d.nll / math.log(2) / d.bytes, rel=1e-12)
    assert zh.bytes > 2 * sum(len(t) for t in TEXTS[2:4])  # CJK characters are 3 bytes each


@pytest.mark.parametrize("dummy_prefix", [False, True], ids=["no-dummy-prefix", "dummy-prefix"])
def test_bits_per_byte_divides_the_nll_of_the_scored_tokens_by_the_bytes_of_those_tokens(dummy_prefix):
    from tests.tokenizer_fixtures import train_tiny_model

    tok = Tokenizer(train_tiny_model(add_dummy_prefix=dummy_prefix))
    docs = ["天地玄黄", "The quick brown fox", "𝔘 fox"]  # 𝔘 is four byte pieces
    first = [tok.encode(t, add_special_tokens=False)[0] for t in docs]
    # Llama-2's rule starts "𝔘 fox" with a lone dummy `▁`, HammerLLM's with 𝔘's first byte.
    assert [tok.id_to_piece(i) for i in first][2] == ("\u2581" if dummy_prefix else "<0xF0>")
    d = harness.evaluate(IdScorer(), tok, {"d": docs})["d"]
    # Each first token (its NLL not in the sum) leaves its bytes out of the count too: one for a byte
    # piece, else what it decodes to ("The" for "▁The", nothing for a lone `▁`: the dummy prefix is no
    # byte of the text).
    first_bytes = [1 if tok.sp.is_byte(i) else len(tok.decode([i]).encode()) for i in first]
    assert d.bytes == sum(len(t.encode()) for t in docs) - sum(first_bytes)
    assert d.bits_per_byte == pytest.approx(d.nll / math.log(2) / d.bytes, rel=1e-12)
    # Counting the first tokens' bytes too would have made bits per byte smaller than the truth.
    assert d.bits_per_byte > d.nll / math.log(2) / sum(len(t.encode()) for t in docs)


def test_reference_tokenizer_normalization_divides_the_nll_by_the_reference_token_count(hammerllm_dir):
    model_tok = Tokenizer.from_pretrained(hammerllm_dir / "tokenizer")
    reference = Tokenizer.from_pretrained(hammerllm_dir / "reference-tokenizers" / "llama2-7b")
    docs = ["北京是中国的首都，上海是最大的城市。" * 20, "The quick brown fox jumps over the lazy dog. " * 5]
    result = harness.evaluate(IdScorer(), model_tok, {"d": docs}, max_tokens=300, reference_tokenizer=reference)
    d = result["d"]
    llama2 = spm.SentencePieceProcessor(
        model_file=str(hammerllm_dir / "reference-tokenizers" / "llama2-7b" / "tokenizer.model"))
    reference_tokens = sum(len(llama2.encode(t[:100])) for t in docs)
    assert d.reference_tokens == reference_tokens
    assert d.loss_norm == pytest.approx(d.nll / reference_tokens, rel=1e-12)
    assert d.ppl_norm == pytest.approx(math.exp(d.nll / reference_tokens), rel=1e-12)
    # Llama-2 spends more tokens on Chinese than HammerLLM: the per-reference-token loss is lower.
    assert d.reference_tokens > d.scored_tokens + len(docs)
    assert result.average_ppl_norm == pytest.approx(d.ppl_norm, rel=1e-12)


def test_length_batches_sort_by_length_pad_to_few_shapes_and_cover_every_scorable_document():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 50, n)) for n in rng.integers(0, 300, 41)]
    ladder = (16, 24, 32, 48, 64, 96, 128, 192, 256, 280)
    for fixed_shapes in (True, False):
        seen = []
        for rows, batch, lengths in harness.length_batches(docs, 8, 280, fixed_shapes):
            assert batch.dtype == np.int32
            if fixed_shapes:
                assert batch.shape[0] in (1, 2, 4, 8)
                assert batch.shape[1] in ladder or batch.shape[1] == lengths.max()
            else:
                assert batch.shape == (len(rows), lengths.max())
            for r, i in enumerate(rows):
                assert lengths[r] == len(docs[i])
                assert batch[r, : lengths[r]].tolist() == docs[i] and not batch[r, lengths[r]:].any()
            assert not lengths[len(rows):].any()
            seen.extend(rows)
        assert sorted(seen) == [i for i, d in enumerate(docs) if len(d) >= 2]
        assert [len(docs[i]) for i in seen] == sorted(len(docs[i]) for i in seen)


def test_fixed_shape_scorers_get_the_same_numbers_from_padded_batches(tokenizer):
    docs = TEXTS + ["北京", "A b"]
    exact = harness.evaluate(IdScorer(), tokenizer, {"d": docs}, batch_size=3)["d"]
    fixed = IdScorer(fixed_shapes=True)
    padded = harness.evaluate(fixed, tokenizer, {"d": docs}, batch_size=3)["d"]
    assert padded.nll == pytest.approx(exact.nll, rel=1e-12)
    assert {shape[0] for shape in fixed.calls} <= {1, 2, 3} and all(s[1] % 8 == 0 for s in fixed.calls)


def test_domain_files_are_jsonl_with_a_text_field_or_txt_with_a_document_per_line(tmp_path, domain_files):
    assert read_documents(domain_files["en"])[0] == TEXTS[0]
    assert read_documents(domain_files["zh"]) == TEXTS[2:4] + ["语言模型。" * 3, "我们在学习"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(DocumentError, match="bad.jsonl:2 has no string field 'text'"):
        read_documents(bad)
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DocumentError, match="latin1.txt is not UTF-8"):
        read_documents(tmp_path / "latin1.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DocumentError, match="blank.txt holds no documents"):
        read_documents(tmp_path / "blank.txt")


def test_hammer_eval_prints_a_table_or_with_json_only_json_on_stdout_matching_the_harness(
        tiny_model_dir, domain_files, tokenizer, hf_scorer, capsys):
    argv = ["eval", "--model", str(tiny_model_dir), "--backend", "hf", "--max-tokens", "90",
            "--data", f"en={domain_files['en']}", f"zh={domain_files['zh']}"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["domain", "docs", "tokens", "loss", "ppl", "bits/byte"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["en", "zh", "average"]
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON document
    expected = harness.evaluate(hf_scorer, tokenizer, {n: read_documents(f)
                                                       for n, f in domain_files.items()}, max_tokens=90)
    assert report["backend"] == "hf" and report["max_tokens"] == 90
    for name in ("en", "zh"):
        assert report["domains"][name]["loss"] == pytest.approx(expected[name].loss, rel=1e-6)
        assert report["domains"][name]["bits_per_byte"] == pytest.approx(expected[name].bits_per_byte, rel=1e-6)
        assert report["domains"][name]["documents"] == expected[name].documents
    assert report["average"]["ppl"] == pytest.approx(expected.average_ppl, rel=1e-6)
    assert f"{expected.average_ppl:.3f}" in table.splitlines()[-1]
    # Those are hammer's ids: transformers reads this HammerLLM-style directory with a `▁` prefix.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_model_dir)(TEXTS[2])["input_ids"] != tokenizer.encode(TEXTS[2])


def test_hammer_eval_reports_the_normalized_ppl_with_a_reference_tokenizer(
        tiny_model_dir, domain_files, tokenizer, capsys):
    argv = ["eval", "--model", str(tiny_model_dir), "--backend", "hf", "--data", f"zh={domain_files['zh']}",
            "--reference-tokenizer", str(tiny_model_dir)]
    # The model's own tokenizer as the reference: each document's tokens, the first one included.
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[-1] == "ppl_norm"
    assert main(argv + ["--json"]) == 0
    zh = json.loads(capsys.readouterr().out)["domains"]["zh"]
    assert zh["reference_tokens"] == zh["scored_tokens"] + zh["documents"]
    assert zh["loss_norm"] == pytest.approx(zh["nll"] / zh["reference_tokens"], rel=1e-12)


def test_hammer_eval_hf_backend_refuses_a_directory_without_hf_weights(tmp_path, tiny_model_dir, domain_files, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert main(["eval", "--model", str(bare), "--tokenizer", str(tiny_model_dir), "--backend", "hf",
                 "--data", f"zh={domain_files['zh']}"]) == 2
    assert "has no HF weights" in capsys.readouterr().err


def test_hammer_eval_refuses_a_tokenizer_with_ids_past_the_models_embedding(
        tiny_model_dir, domain_files, hammerllm_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--tokenizer", str(hammerllm_dir / "tokenizer"),
                 "--backend", "jax", "--data", f"zh={domain_files['zh']}"]) == 2
    assert "has 105789 pieces, more than the 401 of model" in capsys.readouterr().err


@pytest.mark.parametrize("model, data, message", [
    (None, "en", "expected NAME=FILE"),
    (None, "en=/nonexistent/x.jsonl", "/nonexistent/x.jsonl not found"),
    ("/nonexistent/model", "en=x.jsonl", "model directory /nonexistent/model not found"),
])
def test_hammer_eval_rejects_bad_arguments_in_one_line(tiny_model_dir, model, data, message, capsys):
    assert main(["eval", "--model", model or str(tiny_model_dir), "--backend", "hf", "--data", data,
                 "--json"]) == 2
    out, err = capsys.readouterr()
    assert message in err and len(err.strip().splitlines()) == 1
    assert out == ""


def test_torch_scorer_heads_a_slice_of_positions_at_a_time_with_the_same_result(tiny_model_dir, tokenizer, hf_scorer):
    from hammer_torch.scorer import TorchScorer

    whole = harness.evaluate(hf_scorer, tokenizer, {"d": TEXTS}, batch_size=4)["d"]
    sliced_scorer = TorchScorer.from_hf(tiny_model_dir, logits_budget=4 * 3 * 401)  # 3 positions a slice
    sliced = harness.evaluate(sliced_scorer, tokenizer, {"d": TEXTS}, batch_size=4)["d"]
    assert sliced.nll == pytest.approx(whole.nll, rel=1e-6)
