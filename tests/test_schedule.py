"""The optax schedule the JAX trainer runs equals HammerLLM's formula (hammer.schedule) at the
points where its pieces meet, and the weight-decay rule is HF Trainer's."""
import math

import pytest

from hammer.schedule import from_config, learning_rate
from hammer.train_config import TrainConfig
from hammer_jax.optimizer import decays, learning_rate_schedule

CONFIG = TrainConfig(model="m.json", data=("d",), output="o", steps=1000, batch_size=8, lr=5e-4,
                     warmup_steps=100, min_lr_ratio=0.1)
# progress of the cosine at which 0.5 * (1 + cos(pi p)) falls to the floor 0.1
FLOOR_PROGRESS = math.acos(2 * 0.1 - 1) / math.pi
FLOOR_STEP = math.ceil(100 + FLOOR_PROGRESS * 900)


@pytest.mark.parametrize("step", [0, 50, 99, 100, 550, FLOOR_STEP - 1, FLOOR_STEP, 999])
def test_optax_schedule_equals_the_formula(step):
    expected = learning_rate(step, peak=5e-4, warmup_steps=100, total_steps=1000, min_lr_ratio=0.1)
    assert float(learning_rate_schedule(CONFIG)(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert from_config(CONFIG)(step) == expected


def test_the_points_are_what_they_claim():
    formula = from_config(CONFIG)
    assert formula(0) == 0.0  # the first update uses lr(0) = 0, as HF's LambdaLR
    assert formula(50) == pytest.approx(2.5e-4)
    assert formula(100) == pytest.approx(5e-4)  # the end of warmup: the peak
    assert formula(550) == pytest.approx(2.5e-4)  # the cosine halfway
    assert formula(FLOOR_STEP - 1) > 5e-5 and formula(FLOOR_STEP) == pytest.approx(5e-5)
    assert formula(999) == pytest.approx(5e-5)  # clamped, not rescaled to end at the floor


def test_no_warmup_starts_at_the_peak():
    config = CONFIG.replace(warmup_steps=0)
    assert float(learning_rate_schedule(config)(0)) == pytest.approx(5e-4, rel=1e-6)
    assert float(learning_rate_schedule(config)(10)) == pytest.approx(from_config(config)(10), rel=1e-6)


def test_weight_decay_skips_norms_and_biases_only():
    assert not decays("layers.0.input_layernorm.scale")
    assert not decays("layers.post_attention_layernorm.scale")
    assert not decays("norm.scale")
    assert not decays("layers.0.self_attn.q_proj.bias")
    assert decays("embed_tokens.embedding")
    assert decays("lm_head.kernel")
    assert decays("layers.0.mlp.down_proj.kernel")
