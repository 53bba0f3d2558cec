"""Synthetic frames from a ceiling-mounted 16x16 thermopile array, labelled with how many people are in view.

A low-resolution thermal sensor sees no faces, which is why it is used for privacy-preserving
occupancy sensing (HVAC and lighting control). The scene model:

* the sensor hangs 2.4-3.0 m up with a 90 deg field of view, so one pixel covers ~30-40 cm of floor;
* the room is at 18-28 degC, with a smooth gradient (window, floor heating) and the lens
  vignetting that makes thermopile edge pixels read low;
* a person seen from above is a head-and-shoulders blob, 1-2 pixels across; because the body fills
  only part of a pixel, the contrast is (surface temperature - ambient) x fill factor, so people
  are faint in a warm room, and a person at the edge of the field of view is partly cut off;
* distractors that are not people: a pet (smaller, as warm), a hot drink or a laptop (one very hot
  pixel), a radiator along a wall, a sunlit floor patch, and the warm seat someone just left;
* the sensor adds fixed-pattern offsets per pixel and temporal noise of 0.1-0.35 K (NETD).

numpy only: this module is imported at run time by nodes that feed the deployed model.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import numpy.typing as npt

GRID = 16
AMBIENT_RANGE_C = (18.0, 28.0)
BACKGROUND_SCALE_K = 4.0


class Occupancy(IntEnum):
    """Class labels; the value is the model's output index."""

    EMPTY = 0
    ONE_PERSON = 1
    TWO_PEOPLE = 2
    THREE_OR_MORE = 3


CLASS_NAMES = tuple(c.name.lower() for c in Occupancy)

_YY, _XX = np.mgrid[0:GRID, 0:GRID].astype(np.float64)


def _blob(cy: float, cx: float, sy: float, sx: float, angle: float) -> npt.NDArray[np.float64]:
    dy, dx = _YY - cy, _XX - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))


def _add_distractor(frame: npt.NDArray[np.float64], ambient: float, rng: np.random.Generator) -> None:
    kind = rng.integers(5)
    cy, cx = rng.uniform(0, GRID - 1, 2) if kind != 3 else rng.uniform(2, GRID - 3, 2)
    if kind == 0:  # pet: a dog or cat, smaller than a person
        contrast = (rng.uniform(30, 35) - ambient) * rng.uniform(0.25, 0.5)
        sigma = rng.uniform(0.3, 0.45)
        frame += max(contrast, 0.5) * _blob(cy, cx, sigma, sigma * 1.4, rng.uniform(0, np.pi))
    elif kind == 1:  # hot drink or laptop: one hot pixel
        frame += rng.uniform(3, 12) * _blob(cy, cx, 0.3, 0.3, 0.0)
    elif kind == 2:  # radiator along a wall
        strip = rng.uniform(1.5, 6.0) * np.exp(-_XX / rng.uniform(0.5, 1.2))
        frame += strip if rng.random() < 0.5 else strip.T
    elif kind == 3:  # sunlit floor patch: large and warm, low contrast
        sy, sx = rng.uniform(2, 4, 2)
        frame += rng.uniform(0.8, 2.5) * _blob(cy, cx, sy, sx, rng.uniform(0, np.pi))
    else:  # residual heat on a seat someone just left
        frame += rng.uniform(0.5, 1.5) * _blob(cy, cx, 0.9, 1.3, rng.uniform(0, np.pi))


def synthesize(people: int, rng: np.random.Generator) -> np.ndarray:
    """One frame of apparent temperatures in degC, shape ``(GRID, GRID)``, float32."""
    ambient = rng.uniform(*AMBIENT_RANGE_C)
    gy, gx = rng.normal(0, 0.08, 2)
    frame = ambient + gy * (_YY - GRID / 2) + gx * (_XX - GRID / 2)
    r2 = ((_YY - 7.5) ** 2 + (_XX - 7.5) ** 2) / 7.5**2
    frame -= rng.uniform(0.2, 1.0) * r2

    centres: list[np.ndarray] = []
    while len(centres) < people:
        # Centres may sit just outside the field of view, leaving a partial blob at the edge.
        c = rng.uniform(-0.3, GRID - 0.7, 2)
        if all(np.hypot(*(c - o)) >= 2.6 for o in centres):
            centres.append(c)
    for cy, cx in centres:
        contrast = (rng.uniform(29, 34) - ambient) * rng.uniform(0.45, 0.9)
        sigma = rng.uniform(0.55, 0.9)
        frame += max(contrast, 1.5) * _blob(
            cy, cx, sigma, sigma * rng.uniform(1.1, 1.6), rng.uniform(0, np.pi)
        )

    for _ in range(rng.poisson(0.8)):
        _add_distractor(frame, ambient, rng)

    frame += rng.normal(0, rng.uniform(0.05, 0.25), (GRID, GRID))  # fixed pattern
    frame += rng.normal(0, rng.uniform(0.1, 0.35), (GRID, GRID))  # temporal noise
    return frame.astype(np.float32)


def preprocess(frame: np.ndarray) -> np.ndarray:
    """Model input for one frame: degrees above the frame's median, in units of 4 K, ``(GRID, GRID, 1)``.

    The median of a mostly empty room is its background temperature; a fixed scale (not the
    frame's own spread) keeps an empty, noisy frame looking flat.
    """
    f = np.asarray(frame, dtype=np.float32)
    return ((f - np.median(f)) / BACKGROUND_SCALE_K).reshape(GRID, GRID, 1).astype(np.float32)


def make_dataset(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled, preprocessed frames ``(N, GRID, GRID, 1)`` float32 and labels ``(N,)`` int64."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.array([c.value for c in Occupancy]), n_per_class)
    rng.shuffle(labels)
    frames = []
    for y in labels:
        people = int(y) if y < Occupancy.THREE_OR_MORE else int(rng.integers(3, 5))
        frames.append(preprocess(synthesize(people, rng)))
    return np.stack(frames), labels.astype(np.int64)
