"""A training loop for MultiWorkerMirroredStrategy, driving the same Keras callbacks as `fit`.

Keras 3's `fit` does not run under MultiWorkerMirroredStrategy (it reduces
per-replica batches and metrics in ways the collective strategy rejects;
keras-team/keras#20585, tensorflow/tensorflow#72388). This is the loop
TensorFlow's multi-worker guide writes by hand: `strategy.run` of one step
inside a `tf.function`, losses averaged over the global batch, results
summed across replicas. One- and multi-device runs in one process keep `fit`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import keras
import tensorflow as tf


def _step_functions(model: keras.Model, strategy: tf.distribute.Strategy, class_weight, jit: bool):
    weights = None
    if class_weight:
        weights = tf.constant([class_weight[i] for i in range(len(class_weight))], dtype=tf.float32)
    optimizer = model.optimizer

    def losses(y, probabilities):
        per_example = keras.losses.sparse_categorical_crossentropy(y, tf.cast(probabilities, tf.float32))
        return per_example * tf.gather(weights, y) if weights is not None else per_example

    def train_step(x, y):
        with tf.GradientTape() as tape:
            probabilities = model(x, training=True)
            per_example = losses(y, probabilities)
            # Sum over the replica's examples divided by the *global* count: the all-reduced
            # gradient is then the gradient of the global mean, whatever the split.
            replicas = strategy.num_replicas_in_sync
            loss = tf.reduce_sum(per_example) / tf.cast(tf.shape(y)[0] * replicas, tf.float32)
            scaled = optimizer.scale_loss(loss)  # loss scaling under mixed_float16; identity otherwise
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return _sums(y, probabilities, per_example)

    def test_step(x, y):
        probabilities = model(x, training=False)
        return _sums(y, probabilities, losses(y, probabilities))

    def _sums(y, probabilities, per_example):
        hits = tf.cast(tf.equal(tf.argmax(probabilities, axis=-1, output_type=tf.int32), y), tf.float32)
        return tf.reduce_sum(per_example), tf.reduce_sum(hits), tf.cast(tf.shape(y)[0], tf.float32)

    def distributed(step):
        @tf.function(jit_compile=jit)
        def run(x, y):
            sums = strategy.run(step, args=(x, y))
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in sums]

        return run

    return distributed(train_step), distributed(test_step)


def _epoch(step, batches) -> tuple[float, float]:
    loss = hits = count = 0.0
    for x, y in batches:
        batch_loss, batch_hits, batch_count = step(x, y)
        loss, hits, count = loss + float(batch_loss), hits + float(batch_hits), count + float(batch_count)
    return loss / max(count, 1.0), hits / max(count, 1.0)


def fit_multi_worker(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    *,
    epochs: int,
    steps_per_epoch: int,
    initial_epoch: int,
    class_weight: dict[int, float] | None,
    callbacks: Sequence[keras.callbacks.Callback],
    jit_compile: bool,
) -> None:
    """Train a compiled model epoch by epoch, with loss, accuracy, val_loss and val_accuracy logs.

    The callbacks see what `fit` would show them, so BackupAndRestore, early
    stopping, checkpoints and the loggers work unchanged. `train` repeats
    forever; an epoch is `steps_per_epoch` of its batches.
    """
    train_step, test_step = _step_functions(model, strategy, class_weight, jit_compile)
    train_batches = iter(strategy.experimental_distribute_dataset(train))
    val_dist = strategy.experimental_distribute_dataset(val)
    callback_list = keras.callbacks.CallbackList(list(callbacks), model=model, epochs=epochs, verbose=0)
    model.stop_training = False
    callback_list.on_train_begin()
    restored = getattr(model, "_initial_epoch", None)  # set by BackupAndRestore on resume
    for epoch in range(max(initial_epoch, restored or 0), epochs):
        if model.stop_training:
            break
        callback_list.on_epoch_begin(epoch)
        loss, accuracy = _epoch(train_step, itertools.islice(train_batches, steps_per_epoch))
        val_loss, val_accuracy = _epoch(test_step, val_dist)
        logs = {
            "accuracy": accuracy,
            "loss": loss,
            "val_accuracy": val_accuracy,
            "val_loss": val_loss,
            "learning_rate": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
        }
        callback_list.on_epoch_end(epoch, logs)
    callback_list.on_train_end()
