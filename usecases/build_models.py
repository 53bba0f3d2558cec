"""Train, convert and evaluate the use-case models, and write their model cards.

Needs TensorFlow, which is never a runtime dependency of edgeward; use a separate environment::

    python3 -m venv tfenv && tfenv/bin/pip install tensorflow-cpu ai-edge-litert
    tfenv/bin/python usecases/build_models.py [--only industrial|smart_home|automotive]

(scikit-learn is not needed: every data set comes from the numpy generators in this package.)

Every model is written twice, float32 and full-int8 (int8 inputs and outputs, calibrated on
training data), and both files are evaluated on a held-out split with the same LiteRT code path
that runs them on the nodes (``usecases.runtime``). Training is seeded and the op determinism of
TensorFlow is enabled, so a re-run on the same versions reproduces the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    # Run as a script from a checkout: make the ``usecases`` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

from usecases.readme_figures import update_readme
from usecases.runtime import LiteModel, op_names

logger = logging.getLogger(__name__)

Dataset = tuple[np.ndarray, np.ndarray]

USECASES_DIR = Path(__file__).resolve().parent
INT8_TOLERANCE = 0.01  # int8 accuracy may trail float32 by at most one point on the held-out split
SIZE_LIMIT_BYTES = 300_000
REPRESENTATIVE_SAMPLES = 500


# ---------------------------------------------------------------------------------------------
# Shared steps


def set_seeds(seed: int) -> None:
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def count_macs(model: tf.keras.Model) -> dict[str, int]:
    """Multiply-accumulates per layer for one sample, from the layers' shapes."""
    macs: dict[str, int] = {}
    for layer in model.layers:
        out_shape = layer.output.shape[1:]
        if isinstance(layer, tf.keras.layers.DepthwiseConv2D):
            kernel = int(np.prod(layer.kernel_size))
            macs[layer.name] = int(np.prod(out_shape)) * kernel
        elif isinstance(layer, tf.keras.layers.Conv1D | tf.keras.layers.Conv2D):
            in_channels = layer.input.shape[-1]
            kernel = int(np.prod(layer.kernel_size))
            macs[layer.name] = int(np.prod(out_shape)) * kernel * in_channels // layer.groups
        elif isinstance(layer, tf.keras.layers.Dense):
            macs[layer.name] = int(layer.input.shape[-1]) * int(out_shape[-1])
    return macs


def convert(
    model: tf.keras.Model,
    input_name: str,
    output_names: list[str],
    representative: Callable[[], Iterator[list[np.ndarray]]],
) -> tuple[bytes, bytes]:
    """float32 and full-int8 flatbuffers with a named, batch-1 ``serving_default`` signature."""

    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = model(x, training=False)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        return dict(zip(output_names, outputs, strict=True))

    archive = tf.keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serve,
        input_signature=[tf.TensorSpec((1, *model.input.shape[1:]), tf.float32, name=input_name)],
    )
    # Keras' export archive freezes the variables; converting a tf.function's concrete function
    # directly leaves READ_VARIABLE ops that int8 calibration cannot run.
    with tempfile.TemporaryDirectory() as saved:
        archive.write_out(saved, verbose=False)
        f32 = tf.lite.TFLiteConverter.from_saved_model(saved).convert()
        int8 = _convert_int8(tf.lite.TFLiteConverter.from_saved_model(saved), representative)
    return f32, int8


def _convert_int8(
    converter: tf.lite.TFLiteConverter, representative: Callable[[], Iterator[list[np.ndarray]]]
) -> bytes:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def representative_from(x: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """Calibration batches drawn from the training data in a fixed order."""
    rng = np.random.default_rng(1234)
    picks = rng.choice(len(x), size=min(REPRESENTATIVE_SAMPLES, len(x)), replace=False)

    def gen() -> Iterator[list[np.ndarray]]:
        for i in picks:
            yield [x[i : i + 1].astype(np.float32)]

    return gen


def predict(model: LiteModel, input_name: str, x: np.ndarray) -> np.ndarray:
    return np.array([int(np.argmax(model(**{input_name: xi})["class_probs"])) for xi in x])


def confusion(y: np.ndarray, predicted: np.ndarray, n_classes: int) -> list[list[int]]:
    """Counts with true classes as rows and predicted classes as columns."""
    matrix = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(matrix, (y, predicted), 1)
    return matrix.tolist()


def describe_file(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    if len(data) > SIZE_LIMIT_BYTES:
        raise SystemExit(f"{path.name} is {len(data)} bytes, over the {SIZE_LIMIT_BYTES} byte budget")
    model = LiteModel(path)
    return {
        "file": path.name,
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": [s.as_card() for s in model.inputs],
        "outputs": [s.as_card() for s in model.outputs],
        "ops": op_names(path),
    }


def toolchain() -> dict[str, str]:
    import ai_edge_litert

    return {
        "tensorflow": tf.__version__,
        "keras": tf.keras.__version__,
        "numpy": np.__version__,
        "ai_edge_litert": getattr(ai_edge_litert, "__version__", "unknown"),
        "python": platform.python_version(),
    }


def write_card(case: str, card: dict[str, Any]) -> None:
    """Write the card, then refresh the figures in the use case's README from it."""
    path = USECASES_DIR / case / "models" / "model_card.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    logger.info("wrote %s", path)
    update_readme(case)


def check_int8(case: str, f32_acc: float, int8_acc: float) -> None:
    if f32_acc - int8_acc > INT8_TOLERANCE:
        raise SystemExit(f"{case}: int8 accuracy {int8_acc:.4f} trails float32 {f32_acc:.4f} by > 1 point")


@dataclass(frozen=True)
class TrainingPlan:
    """Seeds, split sizes and optimiser settings of one model; recorded in its card."""

    seed: int
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    batch_size: int
    learning_rate: float
    train_seed: int = 101
    val_seed: int = 202
    test_seed: int = 303

    def splits_card(self) -> dict[str, Any]:
        return {
            "train": {"per_class": self.n_train, "seed": self.train_seed},
            "validation": {"per_class": self.n_val, "seed": self.val_seed},
            "held_out": {"per_class": self.n_test, "seed": self.test_seed},
        }


def fit(model: tf.keras.Model, plan: TrainingPlan, train: Dataset, val: Dataset) -> dict[str, Any]:
    """Train with Adam on sparse labels, every output on the same labels with equal weight.

    Returns the training section of the card.
    """
    n_out = len(model.outputs)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(plan.learning_rate),
        loss=["sparse_categorical_crossentropy"] * n_out,
        metrics=[["accuracy"]] * n_out,
    )
    history = model.fit(
        train[0],
        [train[1]] * n_out,
        validation_data=(val[0], [val[1]] * n_out),
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        callbacks=[
            tf.keras.callbacks.ReduceLROnPlateau(patience=4, factor=0.5),
            tf.keras.callbacks.EarlyStopping(patience=8, restore_best_weights=True),
        ],
        verbose=2,
    )
    return {
        "seed": plan.seed,
        "optimizer": "adam",
        "loss": "sparse categorical cross-entropy" + (f", summed over {n_out} exits" if n_out > 1 else ""),
        "learning_rate": plan.learning_rate,
        "batch_size": plan.batch_size,
        "max_epochs": plan.epochs,
        "epochs_run": len(history.history["loss"]),
        "callbacks": "ReduceLROnPlateau(patience=4, factor=0.5), EarlyStopping(patience=8, best weights)",
        "int8_calibration": f"{REPRESENTATIVE_SAMPLES} training samples",
        "toolchain": toolchain(),
    }


def export_pair(
    model: tf.keras.Model,
    out_dir: Path,
    stem: str,
    input_name: str,
    output_names: list[str],
    calibration: np.ndarray,
) -> dict[str, Path]:
    """Write ``<stem>_f32.tflite`` and ``<stem>_int8.tflite``; returns their paths by variant."""
    f32, int8 = convert(model, input_name, output_names, representative_from(calibration))
    paths = {"float32": out_dir / f"{stem}_f32.tflite", "int8": out_dir / f"{stem}_int8.tflite"}
    paths["float32"].write_bytes(f32)
    paths["int8"].write_bytes(int8)
    return paths


def prepare_out_dir(case: str) -> Path:
    out_dir = USECASES_DIR / case / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    # The card's presence means the model files beside it are final: remove it while rebuilding.
    (out_dir / "model_card.json").unlink(missing_ok=True)
    return out_dir


def build_classifier(
    case: str,
    name: str,
    task: str,
    generator: Any,
    input_name: str,
    model: tf.keras.Model,
    plan: TrainingPlan,
    data_card: dict[str, Any],
    derived_metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None,
) -> None:
    """Train, export and evaluate a single-model classifier, then write its card.

    ``derived_metrics(y, predicted)`` adds use-case figures (such as presence from a count) to
    each variant's entry.
    """
    out_dir = prepare_out_dir(case)
    set_seeds(plan.seed)
    train = generator.make_dataset(plan.n_train, plan.train_seed)
    val = generator.make_dataset(plan.n_val, plan.val_seed)
    x_test, y_test = generator.make_dataset(plan.n_test, plan.test_seed)

    training = fit(model, plan, train, val)
    paths = export_pair(model, out_dir, name, input_name, ["class_probs"], train[0])
    variants: dict[str, Any] = {}
    for variant, path in paths.items():
        info = describe_file(path)
        predicted = predict(LiteModel(path), input_name, x_test)
        info["accuracy"] = float(np.mean(predicted == y_test))
        if derived_metrics is not None:
            info.update(derived_metrics(y_test, predicted))
        info["confusion_matrix"] = confusion(y_test, predicted, len(generator.CLASS_NAMES))
        variants[variant] = info
        logger.info(
            "%s %s: %d bytes, held-out accuracy %.4f", case, variant, info["size_bytes"], info["accuracy"]
        )
    check_int8(case, variants["float32"]["accuracy"], variants["int8"]["accuracy"])

    macs = count_macs(model)
    card = {
        "name": name,
        "use_case": case,
        "task": task,
        "classes": list(generator.CLASS_NAMES),
        "data": {
            "source": f"synthetic, usecases.{case}.generator (numpy, seeded)",
            "generator": f"usecases.{case}.generator.make_dataset",
            **data_card,
            "splits": plan.splits_card(),
        },
        "metric": "top-1 accuracy on the held-out split, LiteRT interpreter",
        "variants": variants,
        "macs_per_inference": int(sum(macs.values())),
        "macs_per_layer": macs,
        "parameters": int(model.count_params()),
        "training": training,
    }
    write_card(case, card)


# ---------------------------------------------------------------------------------------------
# industrial: vibration condition monitoring


def build_industrial() -> None:
    from usecases.industrial import generator as gen

    plan = TrainingPlan(
        seed=7, n_train=5000, n_val=500, n_test=1000, epochs=40, batch_size=64, learning_rate=3e-3
    )
    set_seeds(plan.seed)
    layers = tf.keras.layers
    inputs = tf.keras.Input((gen.WINDOW_SAMPLES, 1), name="vibration")
    h = inputs
    for i, filters in enumerate((8, 16, 16, 32, 32)):
        h = layers.Conv1D(filters, 9, strides=2, padding="same", use_bias=False, name=f"conv{i + 1}")(h)
        h = layers.BatchNormalization(name=f"bn{i + 1}")(h)
        h = layers.ReLU(name=f"relu{i + 1}")(h)
    h = layers.GlobalAveragePooling1D(name="pool")(h)
    outputs = layers.Dense(len(gen.CLASS_NAMES), activation="softmax", name="classes")(h)
    model = tf.keras.Model(inputs, outputs, name="vibration_cnn")

    build_classifier(
        case="industrial",
        name="vibration_cnn",
        task="motor/bearing condition monitoring: classify one accelerometer window",
        generator=gen,
        input_name="vibration",
        model=model,
        plan=plan,
        data_card={
            "sample_rate_hz": gen.SAMPLE_RATE_HZ,
            "window_samples": gen.WINDOW_SAMPLES,
            "shaft_rpm_range": list(gen.SHAFT_RPM_RANGE),
            "bpfo_per_rev": round(gen.BPFO_PER_REV, 4),
            "bpfi_per_rev": round(gen.BPFI_PER_REV, 4),
            "preprocessing": "usecases.industrial.generator.preprocess: per-window zero mean, unit variance",
        },
    )


# ---------------------------------------------------------------------------------------------
# smart_home: occupancy counting from a 16x16 thermopile array


def build_smart_home() -> None:
    from usecases.smart_home import generator as gen

    plan = TrainingPlan(
        seed=11, n_train=30000, n_val=1000, n_test=1000, epochs=15, batch_size=64, learning_rate=3e-3
    )
    set_seeds(plan.seed)
    layers = tf.keras.layers
    inputs = tf.keras.Input((gen.GRID, gen.GRID, 1), name="thermal")
    h = inputs
    for i, (filters, stride) in enumerate(((16, 1), (32, 2), (32, 1), (64, 2))):
        h = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"conv{i + 1}")(h)
        h = layers.BatchNormalization(name=f"bn{i + 1}")(h)
        h = layers.ReLU(name=f"relu{i + 1}")(h)
    h = layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = layers.Dense(len(gen.CLASS_NAMES), activation="softmax", name="classes")(h)
    model = tf.keras.Model(inputs, outputs, name="occupancy_cnn")

    build_classifier(
        case="smart_home",
        name="occupancy_cnn",
        task="privacy-preserving occupancy counting from one ceiling thermopile frame",
        generator=gen,
        input_name="thermal",
        model=model,
        plan=plan,
        data_card={
            "sensor": f"{gen.GRID}x{gen.GRID} thermopile array, ceiling-mounted, 90 deg field of view",
            "ambient_range_c": list(gen.AMBIENT_RANGE_C),
            "preprocessing": (
                "usecases.smart_home.generator.preprocess: degC above the frame median, "
                f"divided by {gen.BACKGROUND_SCALE_K} K"
            ),
        },
        derived_metrics=lambda y, predicted: {
            "presence_accuracy": float(np.mean((y > 0) == (predicted > 0))),
        },
    )


# ---------------------------------------------------------------------------------------------
# automotive: multi-exit traffic-sign classifier, three separately deployable stages

SLOWDOWN_SAMPLES = 64
SLOWDOWN_EPSILON = 8 / 255
SLOWDOWN_STEPS = 50
SLOWDOWN_STEP_SIZE = 1 / 255


def _conv_block(h: tf.Tensor, filters: int, stride: int, name: str) -> tf.Tensor:
    layers = tf.keras.layers
    h = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=name)(h)
    h = layers.BatchNormalization(name=f"{name}_bn")(h)
    return layers.ReLU(name=f"{name}_relu")(h)


def _sign_stages(n_classes: int) -> list[tf.keras.Model]:
    """Stage models; stages 1 and 2 output [features, exit probabilities], stage 3 the final exit."""
    layers = tf.keras.layers
    stages = []
    shape: tuple[int, ...] = (32, 32, 3)
    plan = (((16, 1), (16, 2)), ((32, 1), (32, 2)), ((48, 1), (48, 2)))
    for k, blocks in enumerate(plan, start=1):
        inputs = tf.keras.Input(shape, name="image" if k == 1 else "features")
        h = inputs
        for j, (filters, stride) in enumerate(blocks, start=1):
            h = _conv_block(h, filters, stride, f"s{k}_conv{j}")
        if k < len(plan):
            # Early heads keep a coarse 4x4 layout: shallow features are too local for a global pool.
            pooled = layers.AveragePooling2D(h.shape[1] // 4, name=f"exit{k}_pool")(h)
            pooled = layers.Flatten(name=f"exit{k}_flatten")(pooled)
            probs = layers.Dense(n_classes, activation="softmax", name=f"exit{k}")(pooled)
            stages.append(tf.keras.Model(inputs, [h, probs], name=f"stage{k}"))
            shape = tuple(h.shape[1:])
        else:
            pooled = layers.GlobalAveragePooling2D(name=f"exit{k}_pool")(h)
            probs = layers.Dense(n_classes, activation="softmax", name=f"exit{k}")(pooled)
            stages.append(tf.keras.Model(inputs, probs, name=f"stage{k}"))
    return stages


def _joint_model(stages: list[tf.keras.Model]) -> tf.keras.Model:
    image = tf.keras.Input(stages[0].input.shape[1:], name="image")
    exits, h = [], image
    for stage in stages[:-1]:
        h, probs = stage(h)
        exits.append(probs)
    exits.append(stages[-1](h))
    return tf.keras.Model(image, exits, name="sign_multi_exit")


def _choose_thresholds(val_exits: list[np.ndarray], y_val: np.ndarray) -> list[float]:
    """Per early exit, the lowest confidence threshold at which exiting costs nothing on the
    validation split: the samples the exit accepts are classified there at least as accurately
    as the final exit classifies the same samples.

    Exits are chosen in order, each over the samples the earlier exits let through. Thresholds
    stop at 0.99 because an int8 softmax output cannot exceed 255/256.
    """
    final_correct = np.argmax(val_exits[-1], axis=1) == y_val
    remaining = np.ones(len(y_val), dtype=bool)
    thresholds = []
    for probs in val_exits[:-1]:
        confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_val
        chosen = 0.99
        for t in np.round(np.arange(0.5, 0.991, 0.01), 2):
            accepted = remaining & (confidence >= t)
            if accepted.sum() >= 20 and correct[accepted].mean() >= final_correct[accepted].mean():
                chosen = float(t)
                break
        thresholds.append(chosen)
        remaining &= confidence < chosen
    return thresholds


def _multi_exit_summary(
    exits: list[np.ndarray], y: np.ndarray, thresholds: list[float], stage_macs: list[int]
) -> dict[str, Any]:
    """Accuracy, exit distribution and mean MACs of the early-exit policy over precomputed exits."""
    n = len(y)
    taken = np.full(n, len(exits), dtype=int)
    for k in range(len(exits) - 2, -1, -1):
        taken[exits[k].max(axis=1) >= thresholds[k]] = k + 1
    predicted = np.array([np.argmax(exits[taken[i] - 1][i]) for i in range(n)])
    cumulative = np.cumsum(stage_macs)
    distribution = [float(np.mean(taken == k + 1)) for k in range(len(exits))]
    return {
        "accuracy": float(np.mean(predicted == y)),
        "exit_distribution": distribution,
        "mean_macs": float(np.mean(cumulative[taken - 1])),
    }


def _all_exits(paths: list[Path], x: np.ndarray) -> list[np.ndarray]:
    from usecases.automotive.multi_exit import MultiExitClassifier

    chain = MultiExitClassifier(paths, [1.0] * (len(paths) - 1), [])
    per_sample = [chain.all_exits(xi) for xi in x]
    return [np.stack([s[k] for s in per_sample]) for k in range(len(paths))]


def _slowdown_attack(model: tf.keras.Model, images: np.ndarray) -> np.ndarray:
    """DeepSloth-style perturbations: signed-gradient steps that push every early exit towards a
    uniform distribution, within an L-inf ball, on the float Keras model; returned as uint8."""
    clean = tf.constant(images.astype(np.float32) / 255.0)
    x = tf.Variable(clean)
    for _ in range(SLOWDOWN_STEPS):
        with tf.GradientTape() as tape:
            exits = model(x, training=False)
            # Cross-entropy to the uniform distribution, minimised over the early exits only.
            loss = -tf.add_n([tf.reduce_mean(tf.math.log(p + 1e-9)) for p in exits[:-1]])
        grad = tape.gradient(loss, x)
        step = x - SLOWDOWN_STEP_SIZE * tf.sign(grad)
        step = tf.clip_by_value(step, clean - SLOWDOWN_EPSILON, clean + SLOWDOWN_EPSILON)
        x.assign(tf.clip_by_value(step, 0.0, 1.0))
    # The clean images lie on the 1/255 grid and epsilon is a multiple of it, so rounding stays
    # within the ball.
    return np.clip(np.round(x.numpy() * 255), 0, 255).astype(np.uint8)


def build_automotive() -> None:
    from usecases.automotive import generator as gen

    case = "automotive"
    plan = TrainingPlan(
        seed=23, n_train=6000, n_val=500, n_test=1000, epochs=30, batch_size=64, learning_rate=3e-3
    )
    out_dir = prepare_out_dir(case)
    data_dir = USECASES_DIR / case / "data"
    data_dir.mkdir(exist_ok=True)
    set_seeds(plan.seed)
    train = gen.make_dataset(plan.n_train, plan.train_seed)
    val = gen.make_dataset(plan.n_val, plan.val_seed)
    test_images, y_test, difficulty = gen.make_images(plan.n_test, plan.test_seed)
    x_test = test_images.astype(np.float32) / 255.0

    stages = _sign_stages(len(gen.CLASS_NAMES))
    joint = _joint_model(stages)
    training = fit(joint, plan, train, val)

    # Export each stage; stage k>1 is calibrated on the float features of stage k-1.
    stage_cards: list[dict[str, Any]] = []
    stage_paths: dict[str, list[Path]] = {"float32": [], "int8": []}
    stage_macs: list[int] = []
    calibration = train[0]
    for k, stage in enumerate(stages, start=1):
        last = k == len(stages)
        input_name = "image" if k == 1 else "features"
        outputs = ["exit_probs"] if last else ["features", "exit_probs"]
        written = export_pair(stage, out_dir, f"sign_stage{k}", input_name, outputs, calibration)
        macs = count_macs(stage)
        stage_macs.append(int(sum(macs.values())))
        stage_cards.append(
            {
                "stage": k,
                "macs": stage_macs[-1],
                "macs_per_layer": macs,
                "parameters": int(stage.count_params()),
                "variants": {variant: describe_file(path) for variant, path in written.items()},
            }
        )
        for variant, path in written.items():
            stage_paths[variant].append(path)
        if not last:
            calibration = stage.predict(calibration[:2000], verbose=0)[0]

    val_exits = _all_exits(stage_paths["float32"], val[0])
    thresholds = _choose_thresholds(val_exits, val[1])
    logger.info("automotive thresholds %s", thresholds)

    summaries: dict[str, Any] = {}
    exit_accuracy: dict[str, list[float]] = {}
    by_difficulty: dict[str, Any] = {}
    bands = [(0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0)]
    for variant, paths in stage_paths.items():
        exits = _all_exits(paths, x_test)
        exit_accuracy[variant] = [float(np.mean(np.argmax(e, axis=1) == y_test)) for e in exits]
        summaries[variant] = _multi_exit_summary(exits, y_test, thresholds, stage_macs)
        by_difficulty[variant] = [
            {
                "difficulty": [round(lo, 3), round(hi, 3)],
                **_multi_exit_summary(
                    [e[(difficulty >= lo) & (difficulty < hi)] for e in exits],
                    y_test[(difficulty >= lo) & (difficulty < hi)],
                    thresholds,
                    stage_macs,
                ),
            }
            for lo, hi in bands
        ]
        logger.info(
            "automotive %s: exit accuracies %s, multi-exit %s",
            variant,
            exit_accuracy[variant],
            summaries[variant],
        )
    for k in range(len(stages)):
        check_int8(f"automotive exit {k + 1}", exit_accuracy["float32"][k], exit_accuracy["int8"][k])
    check_int8("automotive multi-exit", summaries["float32"]["accuracy"], summaries["int8"]["accuracy"])

    slowdown = _build_slowdown(joint, gen, test_images, y_test, stage_paths, thresholds, stage_macs, data_dir)

    card = {
        "name": "sign_multi_exit",
        "use_case": case,
        "task": "traffic-sign classification of a 32x32 camera crop, with early exits",
        "classes": list(gen.CLASS_NAMES),
        "data": {
            "source": f"synthetic, usecases.{case}.generator (numpy, seeded)",
            "generator": f"usecases.{case}.generator.make_dataset",
            "image": "32x32 RGB uint8 crop, rendered at 2x and box-filtered; difficulty uniform in [0, 1]",
            "preprocessing": f"usecases.{case}.generator.preprocess: uint8 / 255 as float32",
            "splits": plan.splits_card(),
        },
        "metric": "top-1 accuracy on the held-out split, LiteRT interpreter, stages chained in float",
        "stages": stage_cards,
        "exits": [
            {
                "exit": k + 1,
                "threshold": thresholds[k] if k < len(thresholds) else None,
                "accuracy": {variant: exit_accuracy[variant][k] for variant in stage_paths},
                "cumulative_macs": int(sum(stage_macs[: k + 1])),
            }
            for k in range(len(stages))
        ],
        "threshold_rule": (
            "per early exit, in order, the lowest threshold in 0.50..0.99 (step 0.01) at which the "
            "validation samples it accepts are classified there at least as accurately as the final "
            "exit classifies the same samples; chosen on the float32 stages, used for both variants"
        ),
        "multi_exit": summaries,
        "multi_exit_by_difficulty": by_difficulty,
        "slowdown": slowdown,
        "parameters": int(joint.count_params()),
        "training": training,
    }
    write_card(case, card)


def _build_slowdown(
    joint: tf.keras.Model,
    gen: Any,
    test_images: np.ndarray,
    y_test: np.ndarray,
    stage_paths: dict[str, list[Path]],
    thresholds: list[float],
    stage_macs: list[int],
    data_dir: Path,
) -> dict[str, Any]:
    """Perturb a class-balanced held-out sample, save clean and perturbed inputs, compare exits."""
    rng = np.random.default_rng(4242)
    per_class = SLOWDOWN_SAMPLES // len(gen.CLASS_NAMES)
    picks = np.concatenate(
        [
            rng.choice(np.flatnonzero(y_test == c), per_class, replace=False)
            for c in range(len(gen.CLASS_NAMES))
        ]
    )
    clean, labels = test_images[picks], y_test[picks]
    perturbed = _slowdown_attack(joint, clean)
    np.save(data_dir / "clean_inputs.npy", clean)
    np.save(data_dir / "slowdown_inputs.npy", perturbed)
    np.save(data_dir / "slowdown_labels.npy", labels)

    result: dict[str, Any] = {
        "method": (
            "DeepSloth-style: signed-gradient descent on the float Keras model, loss = cross-entropy "
            "of every early exit to the uniform distribution, L-inf bounded, rounded to uint8"
        ),
        "samples": len(picks),
        "selection": f"{per_class} per class from the held-out split, seed 4242",
        "epsilon": "8/255",
        "steps": SLOWDOWN_STEPS,
        "step_size": "1/255",
        "files": {
            "clean": "data/clean_inputs.npy",
            "perturbed": "data/slowdown_inputs.npy",
            "labels": "data/slowdown_labels.npy",
        },
    }
    for variant, paths in stage_paths.items():
        result[variant] = {
            name: _multi_exit_summary(
                _all_exits(paths, images.astype(np.float32) / 255.0), labels, thresholds, stage_macs
            )
            for name, images in (("clean", clean), ("perturbed", perturbed))
        }
        logger.info("automotive slowdown %s: %s", variant, result[variant])
    return result


BUILDERS: dict[str, Callable[[], None]] = {
    "industrial": build_industrial,
    "smart_home": build_smart_home,
    "automotive": build_automotive,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), help="build one use case")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name, build in BUILDERS.items():
        if args.only in (None, name):
            build()


if __name__ == "__main__":
    main()
