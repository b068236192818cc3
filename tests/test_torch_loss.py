import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from hammer.config import ModelConfig  # noqa: E402
from hammer_torch.loss import causal_lm_loss, chunked_cross_entropy  # noqa: E402
from hammer_torch.model import Llama  # noqa: E402

VOCAB, HIDDEN = 1013, 44


def inputs(seed: int = 0, tokens: tuple[int, int] = (3, 29)):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(*tokens, HIDDEN, generator=gen, requires_grad=True)
    weight = (0.2 * torch.randn(VOCAB, HIDDEN, generator=gen)).requires_grad_()
    targets = torch.randint(0, VOCAB, tokens, generator=gen)
    targets[0, :5] = -100  # ignored positions count neither in the sum nor in the mean
    return features, weight, targets


def plain(features, weight, targets):
    logits = (features @ weight.T).float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("chunk_size", [1, 10, 16, 87, 1024])  # 87 = all tokens; 10 leaves a remainder
def test_chunked_loss_and_gradients_equal_plain_within_1e_6_relative(chunk_size):
    features, weight, targets = inputs()
    expected = plain(features, weight, targets)
    grads_expected = torch.autograd.grad(expected, (features, weight))
    got = chunked_cross_entropy(features, weight, targets, chunk_size=chunk_size)
    grads_got = torch.autograd.grad(got, (features, weight))
    # Relative: at a loss of 7.5 one float32 ulp is 4.8e-7, and plain CE's own float32 mean is
    # off from the float64 one by a few ulps.
    assert abs(got.item() - expected.item()) <= 1e-6 * expected.item()
    for g, e in zip(grads_got, grads_expected):
        assert (g - e).abs().max() <= 1e-6


def test_chunked_loss_keeps_no_logits_for_backward():
    features, weight, targets = inputs(tokens=(4, 50))

    def saved_shapes(loss_fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t,
                                                      lambda t: t):
            loss_fn(features, weight, targets)
        return [s for s in shapes if s[-1:] == (VOCAB,)]  # logits, log-softmax: (tokens, VOCAB)

    assert (200, VOCAB) in saved_shapes(plain)
    assert saved_shapes(lambda *a: chunked_cross_entropy(*a, chunk_size=16)) == []


def test_causal_lm_loss_equals_cross_entropy_of_the_shifted_logits_and_its_gradients():
    config = ModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=92, num_layers=2,
                         num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    twin = Llama(config, attn_impl="sdpa")
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(3))
    logits = twin(ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    grads_expected = torch.autograd.grad(expected, list(twin.parameters()))
    got = causal_lm_loss(twin, ids, chunk_size=7)
    grads_got = torch.autograd.grad(got, list(twin.parameters()))
    assert abs(got.item() - expected.item()) <= 1e-6 * expected.item()
    for g, e in zip(grads_got, grads_expected):
        assert (g - e).norm() <= 1e-5 * e.norm()


def test_mismatched_targets_are_refused_naming_both_shapes():
    features, weight, targets = inputs()
    with pytest.raises(ValueError, match=r"features \(3, 29, 44\) and targets \(3, 28\)"):
        chunked_cross_entropy(features, weight, targets[:, 1:])
