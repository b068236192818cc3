"""HammerLLM's schedule (hammer.schedule, the one definition both trainers evaluate) at the points
where its pieces meet, its horizon apart from the run's length, and HF Trainer's weight-decay rule."""
import math

import pytest

from hammer.schedule import from_config
from hammer.train_config import TrainConfig
from hammer_jax.optimizer import decays

CONFIG = TrainConfig(model="m.json", data=("d",), output="o", steps=1000, batch_size=8, lr=5e-4,
                     warmup_steps=100, min_lr_ratio=0.1)
# progress of the cosine at which 0.5 * (1 + cos(pi p)) falls to the floor 0.1
FLOOR_PROGRESS = math.acos(2 * 0.1 - 1) / math.pi
FLOOR_STEP = math.ceil(100 + FLOOR_PROGRESS * 900)


def test_the_points_are_what_they_claim():
    formula = from_config(CONFIG)
    assert formula(0) == 0.0  # the first update uses lr(0) = 0, as HF's LambdaLR
    assert formula(50) == pytest.approx(2.5e-4)
    assert formula(100) == pytest.approx(5e-4)  # the end of warmup: the peak
    assert formula(550) == pytest.approx(2.5e-4)  # the cosine halfway
    assert formula(FLOOR_STEP - 1) > 5e-5 and formula(FLOOR_STEP) == pytest.approx(5e-5)
    assert formula(999) == pytest.approx(5e-5)  # clamped, not rescaled to end at the floor


def test_no_warmup_starts_at_the_peak():
    assert from_config(CONFIG.replace(warmup_steps=0))(0) == pytest.approx(5e-4)


def test_past_its_horizon_the_lr_stays_at_the_floor_and_a_stretched_horizon_moves_it():
    kept = CONFIG.replace(steps=2000, schedule_steps=1000)
    assert [from_config(kept)(s) for s in (999, 1000, 1500, 1999)] == [pytest.approx(5e-5)] * 4
    assert from_config(kept)(550) == from_config(CONFIG)(550)
    stretched = CONFIG.replace(steps=2000)  # the horizon follows steps when not given
    assert stretched.horizon == 2000 and from_config(stretched)(1050) == pytest.approx(2.5e-4)


def test_weight_decay_skips_norms_and_biases_only():
    assert not decays("layers.0.input_layernorm.scale")
    assert not decays("layers.post_attention_layernorm.scale")
    assert not decays("norm.scale")
    assert not decays("layers.0.self_attn.q_proj.bias")
    assert decays("embed_tokens.embedding")
    assert decays("lm_head.kernel")
    assert decays("layers.0.mlp.down_proj.kernel")
