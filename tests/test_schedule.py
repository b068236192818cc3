"""The schedules (hammer.schedule, the one definition both trainers evaluate) equal their formulas
at every step; HammerLLM's clamped cosine at the points where its pieces meet, its horizon apart
from the run's length; a WSD run decays from any checkpoint of its stable phase; the weight-decay
rule is HF Trainer's, for HF and JAX names."""
import math
import re

import numpy as np
import pytest

from hammer.config import ConfigError
from hammer.schedule import from_config, history_agrees
from hammer.train_config import TrainConfig
from hammer.weight_decay import decays

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
    assert formula(1200) == pytest.approx(5e-5)  # past the horizon: the cosine's end, not its return


def test_no_warmup_starts_at_the_peak():
    assert from_config(CONFIG.replace(warmup_steps=0))(0) == pytest.approx(5e-4)


def test_past_its_horizon_the_lr_stays_at_the_floor_and_a_stretched_horizon_moves_it():
    kept = CONFIG.replace(steps=2000, schedule_steps=1000)
    assert [from_config(kept)(s) for s in (999, 1000, 1500, 1999)] == [pytest.approx(5e-5)] * 4
    assert from_config(kept)(550) == from_config(CONFIG)(550)
    stretched = CONFIG.replace(steps=2000)  # the horizon follows steps when not given
    assert stretched.horizon == 2000 and from_config(stretched)(1050) == pytest.approx(2.5e-4)


def test_weight_decay_skips_norms_and_biases_only():
    assert not decays("model.layers.0.input_layernorm.weight")  # HF names (the twin's)
    assert not decays("model.norm.weight")
    assert decays("model.embed_tokens.weight") and decays("lm_head.weight")
    assert decays("model.layers.3.self_attn.o_proj.weight")
    assert not decays("layers.0.input_layernorm.scale")  # the JAX model's paths
    assert not decays("layers.post_attention_layernorm.scale")
    assert not decays("norm.scale")
    assert not decays("layers.0.self_attn.q_proj.bias")
    assert decays("embed_tokens.embedding")
    assert decays("lm_head.kernel")
    assert decays("layers.0.mlp.down_proj.kernel")


SHAPES = {"linear": lambda p: 1 - p, "cosine": lambda p: (1 + math.cos(math.pi * p)) / 2,
          "1-sqrt": lambda p: 1 - math.sqrt(p)}
WSD = CONFIG.replace(steps=40, warmup_steps=5, schedule="wsd", decay_steps=12, min_lr_ratio=0.1)


def wsd_formula(s: int, config: TrainConfig) -> float:
    """The issue's words: warmup peak x s / warmup_steps, the peak until steps - decay_steps, then
    peak x (r + (1 - r) x f(p))."""
    peak, r = config.lr, config.min_lr_ratio
    if s < config.warmup_steps:
        return peak * s / config.warmup_steps
    if s <= config.steps - config.decay_steps:
        return peak
    p = (s - (config.steps - config.decay_steps)) / config.decay_steps
    return peak * (r + (1 - r) * SHAPES[config.decay_shape](p))


@pytest.mark.parametrize("shape", SHAPES)
def test_wsd_equals_its_formula_at_every_step(shape):
    config = WSD.replace(decay_shape=shape)
    want = np.array([wsd_formula(s, config) for s in range(config.steps + 1)])
    host = np.array([from_config(config)(s) for s in range(config.steps + 1)])
    np.testing.assert_allclose(host, want, rtol=1e-12, atol=1e-18)
    assert host[5:29].tolist() == [5e-4] * 24 and host[40] == pytest.approx(5e-5)  # stable, floor


def test_cosine_clamped_equals_its_formula_at_every_step():
    config = CONFIG.replace(steps=60, warmup_steps=7)
    want = [5e-4 * s / 7 if s < 7 else 5e-4 * max(0.1, 0.5 * (1 + math.cos(math.pi * (s - 7) / 53)))
            for s in range(60)]
    np.testing.assert_allclose([from_config(config)(s) for s in range(60)], want, rtol=1e-12)


@pytest.mark.parametrize("stop", [5, 17, 28])
def test_a_wsd_run_stopped_in_its_stable_phase_decays_from_there(stop):
    """Resumed from step `stop` with steps = stop + decay_steps: every step already taken had the
    lr it had, and the decay that follows is the planned decay, moved to start at `stop`."""
    planned = from_config(WSD)
    early = from_config(WSD.replace(steps=stop + WSD.decay_steps))
    assert [early(s) for s in range(stop + 1)] == [planned(s) for s in range(stop + 1)]
    start = WSD.steps - WSD.decay_steps
    assert [early(stop + k) for k in range(WSD.decay_steps + 1)] == \
        [planned(start + k) for k in range(WSD.decay_steps + 1)]
    assert history_agrees(WSD, WSD.replace(steps=stop + WSD.decay_steps), stop + 1)


def test_history_agrees_only_where_every_step_taken_kept_its_lr():
    assert not history_agrees(WSD, WSD.replace(steps=30), 20)  # 20 steps; 30 - 12 = 18 decayed
    assert history_agrees(WSD, WSD.replace(steps=30), 19)
    assert not history_agrees(CONFIG, CONFIG.replace(steps=2000), 150)  # the cosine's horizon moves
    assert history_agrees(CONFIG, CONFIG.replace(steps=2000), 100)  # warmup alone


@pytest.mark.parametrize("changes, message", [
    (dict(schedule="wsd"), "decay_steps = 0 is impossible for schedule = 'wsd'; expected 1 to"),
    (dict(schedule="wsd", decay_steps=950), "expected 1 to the horizon (schedule_steps or steps) - warmup_steps = 900"),
    (dict(schedule="linear"), "schedule = 'linear'; expected one of cosine_clamped, wsd"),
    (dict(schedule="wsd", decay_steps=10, decay_shape="sqrt"), "decay_shape = 'sqrt'; expected one of"),
])
def test_impossible_schedules_are_refused_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CONFIG.replace(**changes)
