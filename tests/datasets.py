"""Small class-per-folder datasets that are not the digits, made by the tests themselves.

Each synthetic task's label is a property that survives any colour, position
and size: images get random foreground and background colours (with enough
luminance contrast to survive a grayscale save), random placement and scale,
sides of 40-200 px, and are saved as JPEG or PNG in RGB, L, P or RGBA mode.
The recipe's defaults have to learn all of them (tests/model/test_own_images.py,
bench/recipe.py) without being tuned on any.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]
Painter = Callable[[ImageDraw.ImageDraw, np.random.Generator, int, Colour, Colour], None]


def _luminance(colour: Colour) -> float:
    red, green, blue = colour
    return 0.299 * red + 0.587 * green + 0.114 * blue


def colours(rng: np.random.Generator) -> tuple[Colour, Colour]:
    """A random foreground and background whose luminance differs by at least 70 (of 255)."""
    while True:
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        if abs(_luminance(fg) - _luminance(bg)) >= 70:  # type: ignore[arg-type]
            return fg, bg  # type: ignore[return-value]


def _polygon(
    centre: tuple[float, float], radius: float, corners: int, angle: float
) -> list[tuple[float, float]]:
    return [
        (
            centre[0] + radius * math.cos(angle + 2 * math.pi * k / corners),
            centre[1] + radius * math.sin(angle + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def _placement(
    rng: np.random.Generator, side: int, low: float, high: float
) -> tuple[tuple[float, float], float]:
    """A centre and radius for an object of diameter low..high of the side, fully inside the image."""
    radius = rng.uniform(low, high) * side / 2
    centre = (rng.uniform(radius, side - radius), rng.uniform(radius, side - radius))
    return centre, radius


def _shape(kind: str) -> Painter:
    def paint(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int, fg: Colour, bg: Colour) -> None:
        centre, radius = _placement(rng, side, 0.35, 0.8)
        angle = rng.uniform(-0.25, 0.25)
        if kind == "circle":
            draw.ellipse(
                [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=fg
            )
        elif kind == "square":
            draw.polygon(_polygon(centre, radius, 4, math.pi / 4 + angle), fill=fg)
        elif kind == "triangle":
            draw.polygon(_polygon(centre, radius, 3, -math.pi / 2 + angle), fill=fg)
        else:  # a plus-shaped cross
            arm = radius * 0.3
            for dx, dy in ((radius, arm), (arm, radius)):
                draw.rectangle([centre[0] - dx, centre[1] - dy, centre[0] + dx, centre[1] + dy], fill=fg)

    return paint


def _outline(filled: bool) -> Painter:
    def paint(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int, fg: Colour, bg: Colour) -> None:
        centre, radius = _placement(rng, side, 0.4, 0.85)
        corners = int(rng.choice([0, 3, 4, 5]))
        width = max(2, int(radius * 0.15))
        fill, outline = (fg, fg) if filled else (None, fg)
        if corners == 0:
            box = [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius]
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        else:
            points = _polygon(centre, radius, corners, rng.uniform(0, 2 * math.pi))
            draw.polygon(points, fill=fill, outline=outline, width=width)

    return paint


def _texture(kind: str) -> Painter:
    def paint(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int, fg: Colour, bg: Colour) -> None:
        period = rng.uniform(0.12, 0.25) * side
        phase = rng.uniform(0, period)
        if kind == "stripes":  # at a random angle: orientation does not decide the label
            angle = rng.uniform(0, math.pi)
            normal = (math.cos(angle), math.sin(angle))
            for offset in np.arange(-2 * side, 2 * side, period):
                base = (side / 2 + normal[0] * (offset + phase), side / 2 + normal[1] * (offset + phase))
                along = (-normal[1] * 2 * side, normal[0] * 2 * side)
                half = period / 4
                draw.polygon(
                    [
                        (base[0] - along[0] - normal[0] * half, base[1] - along[1] - normal[1] * half),
                        (base[0] + along[0] - normal[0] * half, base[1] + along[1] - normal[1] * half),
                        (base[0] + along[0] + normal[0] * half, base[1] + along[1] + normal[1] * half),
                        (base[0] - along[0] + normal[0] * half, base[1] - along[1] + normal[1] * half),
                    ],
                    fill=fg,
                )
        elif kind == "checks":
            cells = np.arange(-period + phase, side, period)
            for i, x in enumerate(cells):
                for j, y in enumerate(cells):
                    if (i + j) % 2 == 0:
                        draw.rectangle([x, y, x + period, y + period], fill=fg)
        else:  # dots on a grid
            cells = np.arange(-period + phase, side + period, period)
            dot = period * 0.25
            for x in cells:
                for y in cells:
                    draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=fg)

    return paint


@dataclass(frozen=True)
class Task:
    """A synthetic classification task: class name -> painter."""

    name: str
    classes: dict[str, Painter]
    per_class: int


TASKS: dict[str, Task] = {
    # Like the folder of the issue that found the epoch-counted recipe failing: which object it is.
    "shapes": Task("shapes", {k: _shape(k) for k in ("circle", "square", "triangle", "cross")}, 60),
    # Not which object but how it is drawn: the same random shapes, filled or only outlined.
    "outlines": Task("outlines", {"filled": _outline(True), "outline": _outline(False)}, 50),
    # No object at all: a pattern over the whole image, at a random scale, phase and angle.
    "textures": Task("textures", {k: _texture(k) for k in ("stripes", "checks", "dots")}, 40),
}


def _save(image: Image.Image, target: Path, rng: np.random.Generator) -> None:
    mode = str(rng.choice(["RGB", "RGB", "L", "P", "RGBA"]))
    converted = image.convert(mode) if mode != "P" else image.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode in {"RGB", "L"} and rng.uniform() < 0.5:
        converted.save(target.with_suffix(".jpg"), quality=int(rng.integers(75, 96)))
    else:
        converted.save(target.with_suffix(".png"))


def write_task(task: Task, root: Path, seed: int = 0, per_class: int | None = None) -> Path:
    """Write the task as <root>/<class>/<n>.(png|jpg); returns root."""
    rng = np.random.default_rng(seed)
    for label, paint in task.classes.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class or task.per_class):
            side = int(rng.integers(40, 201))
            fg, bg = colours(rng)
            image = Image.new("RGB", (side, side), bg)
            paint(ImageDraw.Draw(image), rng, side, fg, bg)
            _save(image, root / label / f"{index:03d}", rng)
    return root


def write_digits(root: Path, per_class: int, seed: int = 0) -> Path:
    """A subset of scikit-learn's 8x8 digits, `per_class` of each of the 10 classes, as PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        chosen = rng.choice(np.flatnonzero(digits.target == label), per_class, replace=False)
        for index, row in enumerate(chosen):
            Image.fromarray(pixels[row]).save(root / str(label) / f"{index:03d}.png")
    return root


def write_dataset(name: str, root: Path, seed: int = 0) -> Path:
    """`digits20`, `digits50` or one of TASKS, written under root."""
    if name.startswith("digits"):
        return write_digits(root, int(name.removeprefix("digits")), seed)
    return write_task(TASKS[name], root, seed)


DATASETS = ("digits20", "digits50", *TASKS)


@dataclass(frozen=True)
class Outcome:
    """What the committed recipe did on one dataset."""

    dataset: str
    baseline_accuracy: float
    cnn_accuracy: float
    train_seconds: float
    steps: int
    image_size: int
    batch_size: int
    learned: bool


def train_on(name: str, workdir: Path, train_overrides: dict | None = None, seed: int = 0) -> Outcome:
    """Write dataset `name`, then run ingest..evaluate with the repo's params.yaml pointed at it.

    Only `ingest` changes (and `train_overrides`, for the bench's old recipe); the stages run
    in-process, exactly as `python -m pipeline <stage>` runs them.
    """
    import json
    import time

    import yaml

    from pipeline.config import parse_config
    from pipeline.paths import StagePaths
    from pipeline.stages import stage

    source = write_dataset(name, workdir / f"{name}-images", seed)
    root = workdir / name
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["ingest"].update({"source": "folder", "folder": {"path": str(source)}})
    raw["train"].update(train_overrides or {})
    cfg = parse_config(raw)
    paths = StagePaths.from_config(cfg.paths, root)
    seconds = 0.0
    for step in ("ingest", "validate", "split", "baseline", "train", "evaluate"):
        started = time.perf_counter()
        stage(step).entry()(cfg, paths)
        if step == "train":
            seconds = time.perf_counter() - started
    report = json.loads(paths.train_report.read_text())
    return Outcome(
        dataset=name,
        baseline_accuracy=float(json.loads(paths.baseline_report.read_text())["accuracy"]),
        cnn_accuracy=float(json.loads(paths.metrics.read_text())["accuracy"]),
        train_seconds=seconds,
        steps=int(report["steps_run"]),
        image_size=int(report["recipe"]["image_size"]),
        batch_size=int(report["recipe"]["global_batch_size"]),
        learned=bool(report["learned"]),
    )
