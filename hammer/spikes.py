"""Which steps are loss spikes (OLMo-core's skip-step), written once for both trainers.

A step is a spike when its loss is non-finite, or when the window of the losses of the last
`spike_window` applied steps is full and the loss is more than `spike_sigmas` standard deviations
(of the window, population) above the window's mean. A spike's update is not applied: parameters
and optimizer state stay as they were, and its loss does not enter the window, so a spike neither
widens the band nor poisons the mean. Before the window is full only non-finite losses are spikes.

Written with array functions of `xp` (jax.numpy in the JAX step, torch in the torch step) so that
the decision is made on the device, without reading the loss back.
"""
from __future__ import annotations


def is_spike(loss, window, filled, sigmas: float, xp):
    """Whether `loss` (a scalar) is a spike against `window` ([spike_window] losses, `filled` of
    the applied steps written into it so far, a ring): a boolean scalar of `xp`."""
    mean = xp.mean(window)
    std = xp.sqrt(xp.mean((window - mean) ** 2))
    high = (filled >= window.shape[0]) & (loss > mean + sigmas * std)
    return ~xp.isfinite(loss) | high
