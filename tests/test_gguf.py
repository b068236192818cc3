"""`hammer convert SRC OUT.gguf --to gguf`: read back with gguf's own reader, every tensor is the HF
weight in llama.cpp's layout, the vocabulary is the tokenizer's, the metadata is the config's."""
import json
import shutil

import ml_dtypes
import numpy as np
import pytest

import convert
from convert.gguf_file import gguf_vocab, permute_rope_rows
from hammer.cli import main
from hammer.config import ModelConfig
from hammer.tokenizer import Tokenizer
from tests.eval_fixtures import random_hf_tensors
from tests.tokenizer_fixtures import write_tiny_tokenizer

gguf = pytest.importorskip("gguf")

# GQA (4 query heads on 2 KV heads), so that q and k are permuted with their own head counts; rows
# of 64 fill q8_0's 32-value blocks, the MLP's 80 do not (down_proj falls back to float16); 512
# embedding rows for the tokenizer's 499 pieces.
CONFIG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
                     rope_theta=500000.0)
TOKENIZER_PIECES = 499


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An HF directory: random float32 weights, the tiny SentencePiece tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = write_tiny_tokenizer(root / "tokenizer", TOKENIZER_PIECES)
    tensors = random_hf_tensors(CONFIG, std=0.1)
    convert.save_hf(root / "hf", CONFIG, tensors, tokenizer=tokenizer)
    return root / "hf"


def hammer(*argv):
    return main(["convert", *map(str, argv)])


def read(path):
    """{name: (type name, float32 array in numpy order)} and {key: value} of a GGUF file."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type))
               for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return tensors, fields


def llama_cpp_order(w: np.ndarray, heads: int) -> np.ndarray:
    """Each head's rows as llama.cpp rotates them: row 2i is HF's row i, row 2i+1 HF's row i + D/2."""
    d = w.shape[0] // heads
    order = [h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)]
    return w[order]


def expected_gguf(source) -> dict[str, np.ndarray]:
    _, hf = convert.load_hf(source)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, CONFIG.num_layers)
    out = {}
    for name, w in hf.items():
        if name.endswith("q_proj.weight"):
            w = llama_cpp_order(w, CONFIG.num_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_order(w, CONFIG.num_kv_heads)
        out[names.get_name(name, try_suffixes=(".weight",))] = w
    return out


def test_float32_tensors_equal_the_hf_weights_in_llama_cpp_layout(source, tmp_path):
    assert hammer(source, tmp_path / "m.gguf", "--to", "gguf") == 0
    tensors, fields = read(tmp_path / "m.gguf")
    expected = expected_gguf(source)
    assert sorted(tensors) == sorted(expected)
    assert len(tensors) == 3 + 9 * CONFIG.num_layers  # embedding, final norm and head; 9 per layer
    for name, w in expected.items():
        assert tensors[name][0] == "F32", name
        np.testing.assert_array_equal(tensors[name][1], w, err_msg=name)
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32


def test_the_permutation_turns_hf_rotate_half_rope_into_llama_cpp_pairwise_rope():
    """q.k after RoPE is the same whether HF rotates halves of the original rows or llama.cpp
    rotates neighbouring pairs of the permuted ones (the reason for the permutation)."""
    rng = np.random.default_rng(0)
    d, heads, pos_q, pos_k = 16, 3, 5, 2
    wq, wk, x = rng.standard_normal((heads * d, 24)), rng.standard_normal((heads * d, 24)), rng.standard_normal(24)
    freqs = 10000.0 ** (-np.arange(0, d, 2) / d)

    def rope_halves(v, pos):  # transformers' LlamaRotaryEmbedding + rotate_half
        a, b = v[: d // 2], v[d // 2:]
        c, s = np.cos(pos * freqs), np.sin(pos * freqs)
        return np.concatenate([a * c - b * s, b * c + a * s])

    def rope_pairs(v, pos):  # ggml's rope, mode 0: pairs (2i, 2i+1)
        a, b = v[0::2], v[1::2]
        c, s = np.cos(pos * freqs), np.sin(pos * freqs)
        return np.stack([a * c - b * s, b * c + a * s], axis=1).reshape(-1)

    def scores(wq, wk, rope):
        q, k = (wq @ x).reshape(heads, d), (wk @ x).reshape(heads, d)
        return [rope(q[h], pos_q) @ rope(k[h], pos_k) for h in range(heads)]

    hf = scores(wq, wk, rope_halves)
    llama_cpp = scores(permute_rope_rows(wq, heads), permute_rope_rows(wk, heads), rope_pairs)
    np.testing.assert_allclose(llama_cpp, hf, rtol=1e-12)
    assert not np.allclose(scores(wq, wk, rope_pairs), hf)  # unpermuted rows would be wrong


@pytest.mark.parametrize("dtype, matrix_type, file_type", [
    ("float16", "F16", "MOSTLY_F16"), ("bfloat16", "BF16", "MOSTLY_BF16")])
def test_float16_and_bfloat16_hold_the_rounded_weights_and_norms_stay_float32(
        source, tmp_path, dtype, matrix_type, file_type):
    assert hammer(source, tmp_path / "m.gguf", "--to", "gguf", "--dtype", dtype) == 0
    tensors, fields = read(tmp_path / "m.gguf")
    rounded = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    for name, w in expected_gguf(source).items():
        kind, got = tensors[name]
        assert kind == ("F32" if w.ndim == 1 else matrix_type), name
        np.testing.assert_array_equal(got, w if w.ndim == 1 else w.astype(rounded).astype(np.float32))
    assert fields["general.file_type"] == gguf.LlamaFileType[file_type]


def test_q8_0_quantizes_every_matrix_whose_rows_fill_its_blocks(source, tmp_path):
    assert hammer(source, tmp_path / "m.gguf", "--to", "gguf", "--dtype", "q8_0") == 0
    tensors, fields = read(tmp_path / "m.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for name, w in expected_gguf(source).items():
        kind, got = tensors[name]
        if w.ndim == 1:
            assert kind == "F32"
            np.testing.assert_array_equal(got, w)
        elif w.shape[1] % 32:  # down_proj's rows of 80: float16, as llama.cpp's converter does
            assert kind == "F16" and "ffn_down" in name, name
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
        else:  # each block of 32 is int8 steps of its largest magnitude / 127, the step a float16:
            assert kind == "Q8_0", name  # off by half a step and 127 step roundings at most
            blocks = w.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            error = np.abs(got.reshape(-1, 32) - blocks)
            assert np.all(error <= step * (0.5 + 127 * 2.0**-11)), name
            assert error.mean() < 0.3 * step.mean()  # most values land within the half step
            assert error.max() > 0  # quantized, not stored as is


def test_metadata_and_vocabulary_are_the_models_and_tokenizers(source, tmp_path):
    assert hammer(source, tmp_path / "m.gguf", "--to", "gguf") == 0
    _, fields = read(tmp_path / "m.gguf")
    c = CONFIG
    assert {k: v for k, v in fields.items() if k.startswith(("general.architecture", "llama."))} == {
        "general.architecture": "llama", "llama.vocab_size": 512, "llama.context_length": 128,
        "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 80,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16, "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": c.rope_theta,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(c.rms_norm_eps)}
    tok = Tokenizer.from_pretrained(source)
    pieces = fields["tokenizer.ggml.tokens"]
    assert len(pieces) == 512
    assert pieces[:TOKENIZER_PIECES] == [tok.id_to_piece(i) for i in range(TOKENIZER_PIECES)]
    assert pieces[TOKENIZER_PIECES:] == [f"[PAD{i}]" for i in range(TOKENIZER_PIECES, 512)]
    assert fields["tokenizer.ggml.scores"][:TOKENIZER_PIECES] == pytest.approx(
        [tok.sp.get_score(i) for i in range(TOKENIZER_PIECES)])
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.unk_id] == gguf.TokenType.UNKNOWN
    assert types[tok.bos_id] == types[tok.eos_id] == gguf.TokenType.CONTROL
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.BYTE] == [
        i for i in range(TOKENIZER_PIECES) if tok.sp.is_byte(i)]
    assert types[TOKENIZER_PIECES:] == [gguf.TokenType.UNUSED] * (512 - TOKENIZER_PIECES)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.bos_token_id"],
            fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.unknown_token_id"],
            fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_eos_token"],
            fields["tokenizer.ggml.add_space_prefix"]) == ("llama", 1, 2, 0, True, False, False)


def test_hammerllm_and_llama2_vocabularies_keep_every_piece_type_and_the_dummy_prefix(hammerllm_dir):
    for name, types, dummy_prefix in [
            # HammerLLM's `\0` piece: NORMAL in the model, never emitted under byte fallback.
            ("tokenizer", {"NORMAL": 105287, "UNUSED": 1, "BYTE": 256, "USER_DEFINED": 242, "CONTROL": 2,
                           "UNKNOWN": 1}, False),
            ("reference-tokenizers/llama2-7b", {"NORMAL": 31741, "BYTE": 256, "CONTROL": 2, "UNKNOWN": 1}, True)]:
        tok = Tokenizer.from_pretrained(hammerllm_dir / name)
        pieces, scores, kinds = gguf_vocab(tok, tok.vocab_size)
        assert [p.decode() for p in pieces] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
        assert scores == [tok.sp.get_score(i) for i in range(tok.vocab_size)]
        assert {k.name: kinds.count(int(k)) for k in gguf.TokenType if int(k) in kinds} == types
        assert [i for i, k in enumerate(kinds) if k == gguf.TokenType.UNUSED] == [
            i for i in range(tok.vocab_size) if tok.sp.is_unused(i)]
        assert tok.add_dummy_prefix == dummy_prefix


def test_every_source_format_gives_the_same_file(source, tmp_path):
    """An HF directory, a hammer JAX directory, a JAX training run (its newest step) and a torch
    training run (its newest step_<N>) are converted to equal tensors and metadata."""
    assert hammer(source, tmp_path / "jax", "--to", "jax") == 0
    jax_run = tmp_path / "jax-run"  # a JAX run: config.json and tokenizer beside checkpoints/<step>/params
    shutil.copytree(tmp_path / "jax", jax_run, ignore=shutil.ignore_patterns("params"))
    for step in (1, 3):
        shutil.copytree(tmp_path / "jax" / "params", jax_run / "checkpoints" / str(step) / "params")
    torch_run = tmp_path / "torch-run"  # a torch run: an HF directory per checkpoints/step_<N>/
    for step in (2, 10):
        shutil.copytree(source, torch_run / "checkpoints" / f"step_{step}")
    reference = read_bytes_of(source, tmp_path / "hf.gguf")
    for src in (tmp_path / "jax", jax_run, jax_run / "checkpoints" / "3", torch_run):
        assert read_bytes_of(src, tmp_path / f"{src.name}.gguf") == reference, src


def read_bytes_of(src, dst) -> tuple:
    assert hammer(src, dst, "--to", "gguf") == 0
    tensors, fields = read(dst)
    fields.pop("general.name")  # the file's own name
    return fields, {name: (kind, x.tobytes()) for name, (kind, x) in tensors.items()}


def test_bad_requests_are_refused_in_one_line_and_write_nothing(source, tmp_path, capsys):
    bare = tmp_path / "bare"  # weights without a tokenizer
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    big = tmp_path / "big-tokenizer"
    write_tiny_tokenizer(big, vocab_size=600)
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    cases = [
        ((bare, tmp_path / "a.gguf", "--to", "gguf"), "no SentencePiece tokenizer.model; pass --tokenizer"),
        ((source, tmp_path / "b.gguf", "--to", "gguf", "--tokenizer", big), "600 pieces, more than the 512"),
        ((source, tmp_path / "c", "--to", "hf", "--dtype", "q8_0"), "--dtype q8_0 is a GGUF quantization"),
        ((source, tmp_path / "taken.gguf", "--to", "gguf"), "already exists"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert hammer(*argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "big-tokenizer", "taken.gguf"]
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"


def test_the_tokenizer_option_gives_a_source_without_one_its_vocabulary(source, tmp_path):
    """--tokenizer names the vocabulary of a source without one; its add_bos_token is carried."""
    bare = tmp_path / "bare"
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    tok_dir = tmp_path / "tok"
    write_tiny_tokenizer(tok_dir, TOKENIZER_PIECES)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert hammer(bare, tmp_path / "m.gguf", "--to", "gguf", "--tokenizer", tok_dir) == 0
    _, fields = read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
