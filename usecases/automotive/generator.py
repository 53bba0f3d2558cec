"""Synthetic 32x32 camera crops of traffic signs (or no sign), with a per-image difficulty.

The crops stand in for the second stage of a sign-recognition pipeline, where a detector hands the
classifier a small patch. Each image is rendered at 2x resolution with signed shapes and box-filtered
down (anti-aliasing), then degraded as a dashboard camera degrades it. A difficulty ``d`` in [0, 1]
drawn per image sets how strongly:

* size and framing: the sign spans 24-28 px when easy and down to 7 px when hard, off-centre by up
  to 2 + 6d px;
* pose: in-plane rotation up to 5 + 20d deg and a horizontal squeeze up to 40 % d (viewed at an angle);
* light and weather: brightness, white balance, fog (a blend towards grey), faded paint;
* optics and sensor: defocus blur, pixel noise, and partial occlusion by a foreground object.

Backgrounds are smooth random colour fields with clutter (boxes and disks, some of them red or blue)
and sometimes a sign post, so colour alone does not give the class away.

numpy only: this module is imported at run time by nodes that feed the deployed model.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

SIZE = 32
_SS = 2  # supersampling factor
_N = SIZE * _SS


class Sign(IntEnum):
    """Class labels; the value is the model's output index."""

    NO_SIGN = 0
    STOP = 1
    YIELD = 2
    WARNING = 3
    SPEED_LIMIT = 4
    NO_ENTRY = 5
    AHEAD_ONLY = 6
    PRIORITY_ROAD = 7


CLASS_NAMES = tuple(c.name.lower() for c in Sign)

RED = np.array([0.80, 0.08, 0.10])
WHITE = np.array([0.95, 0.95, 0.95])
BLUE = np.array([0.08, 0.28, 0.72])
YELLOW = np.array([0.96, 0.78, 0.08])
BLACK = np.array([0.05, 0.05, 0.05])
GREY = np.array([0.55, 0.55, 0.55])

_PIX = (np.arange(_N) + 0.5) / _SS  # pixel-centre coordinates in output-pixel units


def _polygon(x: np.ndarray, y: np.ndarray, sides: int, radius: float, vertex_angle: float) -> np.ndarray:
    """Inside test for a regular polygon with circumradius ``radius`` and a vertex at ``vertex_angle``."""
    apothem = radius * np.cos(np.pi / sides)
    normals = vertex_angle + np.pi / sides + 2 * np.pi * np.arange(sides) / sides
    return np.max(x[..., None] * np.cos(normals) + y[..., None] * np.sin(normals), axis=-1) <= apothem


def _disk(x: np.ndarray, y: np.ndarray, r: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _rect(x: np.ndarray, y: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def _sign_layers(sign: Sign, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask, colour) layers, painted in order, in sign coordinates (unit = sign radius, y up)."""
    up, down, flat_top = np.pi / 2, -np.pi / 2, np.pi / 8
    if sign is Sign.STOP:
        text = np.zeros_like(x, dtype=bool)
        for x0 in (-0.62, -0.30, 0.02, 0.34):  # four letters
            text |= _rect(x, y, x0, x0 + 0.24, -0.16, 0.16)
        return [
            (_polygon(x, y, 8, 1.0, flat_top), WHITE),
            (_polygon(x, y, 8, 0.9, flat_top), RED),
            (text, WHITE),
        ]
    if sign is Sign.YIELD:
        return [(_polygon(x, y, 3, 1.0, down), RED), (_polygon(x, y, 3, 0.55, down), WHITE)]
    if sign is Sign.WARNING:
        return [
            (_polygon(x, y, 3, 1.0, up), RED),
            (_polygon(x, y, 3, 0.6, up), WHITE),
            (_rect(x, y, -0.06, 0.06, -0.12, 0.3), BLACK),
            (_disk(x, y, 0.07, 0.0, -0.24), BLACK),
        ]
    if sign is Sign.SPEED_LIMIT:
        digits = np.zeros_like(x, dtype=bool)
        for cx in (-0.22, 0.22):
            outer = ((x - cx) / 0.18) ** 2 + (y / 0.34) ** 2 <= 1
            inner = ((x - cx) / 0.09) ** 2 + (y / 0.22) ** 2 <= 1
            digits |= outer & ~inner
        return [(_disk(x, y, 1.0), RED), (_disk(x, y, 0.76), WHITE), (digits, BLACK)]
    if sign is Sign.NO_ENTRY:
        return [(_disk(x, y, 1.0), RED), (_rect(x, y, -0.66, 0.66, -0.17, 0.17), WHITE)]
    if sign is Sign.AHEAD_ONLY:
        arrow = _rect(x, y, -0.1, 0.1, -0.6, 0.15) | _polygon(x, y - 0.3, 3, 0.36, up)
        return [(_disk(x, y, 1.0), BLUE), (arrow, WHITE)]
    if sign is Sign.PRIORITY_ROAD:
        return [
            (_polygon(x, y, 4, 1.05, up), BLACK),
            (_polygon(x, y, 4, 1.0, up), WHITE),
            (_polygon(x, y, 4, 0.78, up), YELLOW),
        ]
    return []


def _smooth_field(rng: np.random.Generator, cells: int, channels: int) -> np.ndarray:
    """A random colour field, bilinearly upsampled from a ``cells`` x ``cells`` grid to ``_N`` x ``_N``."""
    grid = rng.uniform(0, 1, (cells, cells, channels))
    pos = np.linspace(0, cells - 1, _N)
    i0 = np.clip(np.floor(pos).astype(int), 0, cells - 2)
    f = (pos - i0)[:, None]
    rows = grid[i0] * (1 - f[..., None]) + grid[i0 + 1] * f[..., None]
    cols = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]
    return cols


def _background(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.meshgrid(_PIX, _PIX, indexing="ij")
    img = 0.15 + 0.7 * _smooth_field(rng, int(rng.integers(2, 6)), 3) * rng.uniform(0.4, 1.0)
    for _ in range(int(rng.integers(0, 4))):
        colour = rng.uniform(0, 1, 3)
        if rng.random() < 0.3:  # red or blue clutter: tail lights, shop fronts, cars
            colour = (RED if rng.random() < 0.5 else BLUE) * rng.uniform(0.6, 1.1)
        cx, cy = rng.uniform(0, SIZE, 2)
        w, h = rng.uniform(2, 12, 2)
        mask = _disk(xx, yy, w, cx, cy) if rng.random() < 0.5 else _rect(xx, yy, cx, cx + w, cy, cy + h)
        img[mask] = colour
    if rng.random() < 0.4:  # a sign post, with or without a sign on it
        cx = rng.uniform(10, 22)
        img[_rect(xx, yy, cx - 0.8, cx + 0.8, rng.uniform(12, 20), SIZE)] = GREY * rng.uniform(0.6, 1.2)
    return img


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.2:
        return img
    radius = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(w * padded[i : i + img.shape[0]] for i, w in enumerate(k))
    return sum(w * rows[:, i : i + img.shape[1]] for i, w in enumerate(k))


def synthesize(sign: Sign, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """One RGB crop, shape ``(SIZE, SIZE, 3)``, uint8."""
    d = float(np.clip(difficulty, 0.0, 1.0))
    img = _background(rng)
    yy, xx = np.meshgrid(_PIX, _PIX, indexing="ij")

    if sign is not Sign.NO_SIGN:
        radius = rng.uniform(12.0, 14.0) - 8.5 * d * rng.uniform(0.5, 1.0)
        cx, cy = SIZE / 2 + rng.uniform(-1, 1, 2) * (2 + 6 * d)
        angle = np.deg2rad(rng.uniform(-1, 1) * (5 + 20 * d))
        squeeze = 1 - 0.4 * d * rng.random()
        dx, dy = (xx - cx) / radius, -(yy - cy) / radius  # y up in sign coordinates
        u = (np.cos(angle) * dx + np.sin(angle) * dy) / squeeze
        v = -np.sin(angle) * dx + np.cos(angle) * dy
        fade = 0.5 * d * rng.random()
        if rng.random() < 0.5:  # the post, behind the sign
            img[_rect(xx, yy, cx - 0.8, cx + 0.8, cy, SIZE)] = GREY * rng.uniform(0.6, 1.2)
        for mask, colour in _sign_layers(sign, u, v):
            paint = colour + fade * (GREY - colour)
            img[mask] = paint * rng.uniform(0.9, 1.1, 3)
        if rng.random() < 0.7 * d:  # foreground occluder: a branch, another vehicle's mirror
            ox, oy = cx + rng.uniform(-1, 1, 2) * radius
            w, h = rng.uniform(0.3, 1.0, 2) * radius
            img[_rect(xx, yy, ox, ox + w, oy, oy + h)] = rng.uniform(0, 1, 3)

    img = img.reshape(SIZE, _SS, SIZE, _SS, 3).mean(axis=(1, 3))
    img = img * rng.uniform(1 - 0.7 * d, 1.15) * rng.uniform(1 - 0.25 * d, 1 + 0.25 * d, 3)
    fog = 0.6 * d * rng.random()
    img = (1 - fog) * img + fog * rng.uniform(0.5, 0.8)
    img = _blur(img, 1.4 * d * rng.random())
    img = img + rng.normal(0, 0.01 + 0.08 * d, img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray) -> np.ndarray:
    """Model input for one uint8 RGB crop: float32 in [0, 1], shape ``(SIZE, SIZE, 3)``."""
    return (np.asarray(image, dtype=np.float32) / 255.0).reshape(SIZE, SIZE, 3)


def make_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled uint8 crops ``(N, SIZE, SIZE, 3)``, labels ``(N,)`` int64, difficulties ``(N,)``."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.array([c.value for c in Sign]), n_per_class)
    rng.shuffle(labels)
    difficulty = rng.uniform(0, 1, len(labels))
    images = np.stack([synthesize(Sign(int(y)), d, rng) for y, d in zip(labels, difficulty, strict=True)])
    return images, labels.astype(np.int64), difficulty


def make_dataset(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed crops ``(N, SIZE, SIZE, 3)`` float32 and labels ``(N,)`` int64."""
    images, labels, _ = make_images(n_per_class, seed)
    return images.astype(np.float32) / 255.0, labels
