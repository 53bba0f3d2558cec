"""Synthetic accelerometer windows from an induction motor driving a deep-groove ball bearing.

The signal model follows the usual vibration-analysis picture of rotating machinery:

* the shaft turns at ``f_r`` (a 4-pole motor at 60 Hz mains, 1720-1800 rpm depending on load slip),
  producing a 1x component and a few harmonics whose levels vary from machine to machine;
* **imbalance** adds a dominant once-per-revolution (1x) component; some angular misalignment (2x)
  is present on every machine, so a 2x peak alone does not mean a fault;
* a localised **outer-race** defect is struck by each rolling element, giving an impulse train at
  BPFO; the load zone is fixed, so the impulses all have about the same strength;
* an **inner-race** defect rotates with the shaft, giving impulses at BPFI whose strength is
  modulated once per revolution as the defect passes through the load zone;
* each impulse rings the bearing/housing structural resonance (2.5-4.5 kHz), decaying
  exponentially; the rolling elements slip, so impulse spacing jitters by ~1 %;
* the sensor adds white noise, and the drive adds a little line-frequency (120 Hz) magnetic hum.

Bearing geometry is that of a 6205 deep-groove ball bearing (9 balls, ball diameter 7.94 mm, pitch
diameter 39.04 mm, 0 deg contact angle), which gives BPFO ~ 3.585 f_r and BPFI ~ 5.415 f_r.

numpy only: this module is imported at run time by nodes that feed the deployed model.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

SAMPLE_RATE_HZ = 12_000
WINDOW_SAMPLES = 1024

N_BALLS = 9
BALL_DIAMETER_MM = 7.94
PITCH_DIAMETER_MM = 39.04
CONTACT_ANGLE_RAD = 0.0
_DIAMETER_RATIO = BALL_DIAMETER_MM / PITCH_DIAMETER_MM * np.cos(CONTACT_ANGLE_RAD)
BPFO_PER_REV = N_BALLS / 2 * (1 - _DIAMETER_RATIO)
BPFI_PER_REV = N_BALLS / 2 * (1 + _DIAMETER_RATIO)

SHAFT_RPM_RANGE = (1720.0, 1800.0)
MAINS_HZ = 60.0


class Condition(IntEnum):
    """Class labels; the value is the model's output index."""

    HEALTHY = 0
    IMBALANCE = 1
    OUTER_RACE_FAULT = 2
    INNER_RACE_FAULT = 3


CLASS_NAMES = tuple(c.name.lower() for c in Condition)


def _impulse_train(
    rng: np.random.Generator,
    t: np.ndarray,
    rate_hz: float,
    amplitude: float,
    shaft_hz: float,
    shaft_phase: float,
    load_modulation: float,
) -> np.ndarray:
    """Decaying resonance bursts at ``rate_hz`` with ~1 % slip jitter and optional 1x modulation."""
    duration = t[-1] + 1 / SAMPLE_RATE_HZ
    period = 1 / rate_hz
    n = int(np.ceil(duration / period)) + 2
    times = rng.uniform(-period, 0) + period * np.arange(n)
    times += rng.normal(0, 0.01 * period, n)
    resonance_hz = rng.uniform(2500, 4500)
    decay_s = rng.uniform(0.4e-3, 1.2e-3)
    signal = np.zeros_like(t)
    for t0 in times:
        # The load zone sits at the bottom of the bearing; a defect that rotates with the shaft
        # (inner race) is loaded only while it passes through it.
        gain = 1 + load_modulation * np.cos(2 * np.pi * shaft_hz * t0 + shaft_phase)
        gain *= rng.uniform(0.8, 1.2)
        dt = t - t0
        mask = (dt >= 0) & (dt < 8 * decay_s)
        if mask.any():
            d = dt[mask]
            signal[mask] += amplitude * gain * np.exp(-d / decay_s) * np.sin(2 * np.pi * resonance_hz * d)
    return signal


def synthesize(condition: Condition, rng: np.random.Generator) -> np.ndarray:
    """One raw acceleration window in g, shape ``(WINDOW_SAMPLES,)``, float32."""
    t = np.arange(WINDOW_SAMPLES) / SAMPLE_RATE_HZ
    shaft_hz = rng.uniform(*SHAFT_RPM_RANGE) / 60
    phase = rng.uniform(0, 2 * np.pi)

    # Residual imbalance and misalignment that every machine has.
    one_x = rng.uniform(0.02, 0.15)
    two_x = rng.uniform(0.02, 0.15)
    x = one_x * np.sin(2 * np.pi * shaft_hz * t + phase)
    x += two_x * np.sin(2 * np.pi * 2 * shaft_hz * t + rng.uniform(0, 2 * np.pi))
    for k in (3, 4, 5):
        x += rng.uniform(0, 0.03) * np.sin(2 * np.pi * k * shaft_hz * t + rng.uniform(0, 2 * np.pi))
    x += rng.uniform(0, 0.04) * np.sin(2 * np.pi * 2 * MAINS_HZ * t + rng.uniform(0, 2 * np.pi))

    if condition is Condition.IMBALANCE:
        x += rng.uniform(0.25, 1.0) * np.sin(2 * np.pi * shaft_hz * t + phase)
    elif condition is Condition.OUTER_RACE_FAULT:
        x += _impulse_train(
            rng, t, BPFO_PER_REV * shaft_hz, rng.uniform(0.1, 1.2), shaft_hz, phase, load_modulation=0.0
        )
    elif condition is Condition.INNER_RACE_FAULT:
        x += _impulse_train(
            rng, t, BPFI_PER_REV * shaft_hz, rng.uniform(0.1, 1.2), shaft_hz, phase, load_modulation=0.7
        )

    x += rng.normal(0, rng.uniform(0.01, 0.08), WINDOW_SAMPLES)
    return x.astype(np.float32)


def preprocess(window: np.ndarray) -> np.ndarray:
    """Model input for one raw window: zero mean, unit variance, shape ``(WINDOW_SAMPLES, 1)``.

    Scaling each window by its own spread keeps int8 quantisation resolution independent of the
    sensor's mounting and gain; the model judges the shape of the signal, not its level.
    """
    w = np.asarray(window, dtype=np.float32)
    w = (w - w.mean()) / (w.std() + 1e-6)
    return w.reshape(WINDOW_SAMPLES, 1).astype(np.float32)


def make_dataset(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled, preprocessed windows ``(N, WINDOW_SAMPLES, 1)`` float32 and labels ``(N,)`` int64."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.array([c.value for c in Condition]), n_per_class)
    rng.shuffle(labels)
    x = np.stack([preprocess(synthesize(Condition(int(y)), rng)) for y in labels])
    return x, labels.astype(np.int64)
