"""Document-masked packing: a block packing documents A|B|C computes, at B's positions, the logits
of B run alone (attention within the document, RoPE positions restarting at its [BOS]), on both
backends and every attention kernel that runs on CPU; segment ids and positions come from the
block's BOS ids; the mask changes what a packed block computes (it is not a no-op); kernels that
cannot honour it refuse in one line."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import convert  # noqa: E402
from hammer.config import ModelConfig  # noqa: E402
from hammer.data.loader import document_bos, documents  # noqa: E402
from hammer.data.sources import DataError  # noqa: E402
from hammer_jax import model_from_params  # noqa: E402
from hammer_torch import attention  # noqa: E402
from hammer_torch.checkpoint import from_tensors  # noqa: E402
from tests.eval_fixtures import random_hf_tensors  # noqa: E402

BOS = 1
CONFIG = ModelConfig(vocab_size=131, hidden_size=48, intermediate_size=76, num_layers=2,
                     num_heads=4, num_kv_heads=2, bos_token_id=BOS)
TOLERANCE = 1e-5  # float32, max-abs over logits of magnitude ~1-3


@pytest.fixture(scope="module")
def packed():
    """Weights, and a block [tail of a cut document | A | B | C] (two rows, B in both) with B's slice."""
    rng = np.random.default_rng(0)
    tail, a, b, c = (rng.integers(3, CONFIG.vocab_size, n) for n in (4, 7, 11, 6))
    a, b, c = (np.concatenate([[BOS], d]) for d in (a, b, c))
    rows = np.stack([np.concatenate([tail, a, b, c]), np.concatenate([a, tail, b, c])])
    start = len(tail) + len(a)
    return random_hf_tensors(CONFIG, std=0.12), rows, b, slice(start, start + len(b))


def test_segment_ids_and_positions_restart_at_each_bos():
    block = np.array([[7, 8, BOS, 5, 6, 9, BOS, 4], [BOS, 3, 3, BOS, BOS, 5, 6, 7]])
    segments, positions = documents(block, BOS)
    assert segments.tolist() == [[1, 1, 2, 2, 2, 2, 3, 3], [1, 1, 1, 2, 3, 3, 3, 3]]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 1, 2, 3]]
    assert segments.dtype == positions.dtype == np.int32


def test_a_model_without_bos_cannot_mask_documents():
    assert document_bos(False, None) is None and document_bos(True, 1) == 1
    with pytest.raises(DataError, match="document_mask = true needs the model's bos_token_id"):
        document_bos(True, None)


@pytest.mark.parametrize("impl, scan", [("xla", False), ("reference", False), ("xla", True)])
def test_jax_logits_of_a_packed_document_equal_the_document_alone(packed, impl, scan):
    tensors, rows, b, where = packed
    params = convert.layer_layout(convert.hf_to_jax(tensors, CONFIG), CONFIG, stacked=scan)
    model = model_from_params(CONFIG, params, attention_impl=impl, scan_layers=scan, remat="full" if scan else "none")
    segments, positions = documents(rows, BOS)
    masked = np.asarray(model.head(model.features(jnp.asarray(rows), jnp.asarray(segments),
                                                  jnp.asarray(positions))))
    alone = np.asarray(model(jnp.asarray(b[None])))[0]
    assert np.abs(alone).max() > 1.0
    assert np.abs(masked[0, where] - alone).max() <= TOLERANCE
    assert np.abs(masked[1, where] - alone).max() <= TOLERANCE
    # Without the mask B's logits are those of B in its context: the mask is not a no-op.
    plain = np.asarray(model(jnp.asarray(rows)))
    assert np.abs(plain[0, where] - alone).max() > 0.1


@pytest.mark.slow
def test_jax_splash_attention_honours_segment_ids(packed):
    """Splash (interpret mode) with segment ids equals the XLA kernel's masked logits."""
    tensors, rows, _, _ = packed
    segments, positions = (jnp.asarray(x) for x in documents(rows, BOS))
    logits = {}
    for impl in ("splash", "xla"):
        model = model_from_params(CONFIG, convert.hf_to_jax(tensors, CONFIG), attention_impl=impl)
        logits[impl] = np.asarray(model.head(model.features(jnp.asarray(rows), segments, positions)))
    assert np.abs(logits["splash"] - logits["xla"]).max() <= TOLERANCE


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_torch_logits_of_a_packed_document_equal_the_document_alone(packed, impl):
    tensors, rows, b, where = packed
    twin = from_tensors(CONFIG, tensors, attn_impl=impl)
    segments, positions = (torch.from_numpy(x.astype(np.int64)) for x in documents(rows, BOS))
    with torch.no_grad():
        masked = twin.head(twin.features(torch.from_numpy(rows), segment_ids=segments,
                                         positions=positions)).numpy()
        alone = twin(torch.from_numpy(b[None])).numpy()[0]
        plain = twin(torch.from_numpy(rows)).numpy()
    assert np.abs(masked[0, where] - alone).max() <= TOLERANCE
    assert np.abs(masked[1, where] - alone).max() <= TOLERANCE
    assert np.abs(plain[0, where] - alone).max() > 0.1


def test_jax_and_torch_masked_logits_agree(packed):
    tensors, rows, _, _ = packed
    segments, positions = documents(rows, BOS)
    model = model_from_params(CONFIG, convert.hf_to_jax(tensors, CONFIG), attention_impl="xla")
    jax_logits = np.asarray(model.head(model.features(jnp.asarray(rows), jnp.asarray(segments),
                                                      jnp.asarray(positions))))
    twin = from_tensors(CONFIG, tensors, attn_impl="sdpa")
    with torch.no_grad():
        twin_logits = twin.head(twin.features(
            torch.from_numpy(rows), segment_ids=torch.from_numpy(segments.astype(np.int64)),
            positions=torch.from_numpy(positions.astype(np.int64)))).numpy()
    assert np.abs(jax_logits - twin_logits).max() <= 1e-4


def test_flash_attn_offsets_start_a_document_at_each_segment_and_row():
    segments = torch.tensor([[1, 1, 2, 2, 2], [1, 2, 2, 3, 3]])
    assert attention.document_offsets(segments).tolist() == [0, 2, 5, 6, 8, 10]
    # A row that starts with the segment id the previous row ended with still starts a document.
    assert attention.document_offsets(torch.tensor([[1, 1], [1, 1]])).tolist() == [0, 2, 4]


def test_sdpa_on_cuda_refuses_document_masking_and_auto_passes_it_by():
    reason = attention.unavailable_reason("sdpa", torch.device("cuda"), torch.bfloat16, 64,
                                          document_mask=True)
    assert reason and "takes no document mask" in reason
    assert attention.unavailable_reason("sdpa", torch.device("cuda"), torch.bfloat16, 64) is None
    assert attention.resolve("auto", torch.device("cpu"), torch.float32, 64, document_mask=True) == "sdpa"
    with pytest.raises(attention.AttentionUnavailableError, match="takes no document mask"):
        attention.resolve("sdpa", torch.device("cuda"), torch.bfloat16, 64, document_mask=True)
