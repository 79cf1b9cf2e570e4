"""A Keras 3 model rebuilt as a tf_keras (Keras 2) model with the same weights.

tensorflow-model-optimization 0.8 (quantization-aware training, pruning)
only wraps tf_keras models, and Keras 3 configs do not load in tf_keras
(`batch_shape`, dtype policies, the new node format). This walks the
functional graph instead: every layer is re-created from its own config in
tf_keras and called on the rebuilt tensors of its inputs, nested models
(a keras.applications base) recursively; then the weights are copied layer
by layer. The result computes the same function (checked by the caller).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class UnsupportedModel(ValueError):
    """A layer or graph shape that has no tf_keras counterpart here."""


def _plain(value: Any) -> Any:
    """A Keras 3 config value as tf_keras reads it: dtype policies to names, serialized objects simplified."""
    if isinstance(value, dict):
        if value.get("class_name") == "DTypePolicy" or value.get("class_name") == "FloatDTypePolicy":
            return value["config"]["name"]
        if "class_name" in value and "config" in value:
            return {"class_name": value["class_name"], "config": _plain(value["config"])}
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


# Keras 3 config keys tf_keras layers do not take.
_DROPPED = {"optional", "quantization_config"}


def _layer_config(config: dict) -> dict:
    # Initializers only matter before the weights are copied, and Keras 3 gives them new arguments.
    return {
        key: _plain(value)
        for key, value in config.items()
        if key not in _DROPPED and not key.endswith("_initializer")
    }


def _histories(argument: Any) -> list[tuple[str, int, int]]:
    """The (layer, node, tensor) references of one call argument (a tensor or a list of them)."""
    if isinstance(argument, dict) and argument.get("class_name") == "__keras_tensor__":
        name, node, index = argument["config"]["keras_history"]
        return [(name, int(node), int(index))]
    if isinstance(argument, list | tuple):
        return [ref for item in argument for ref in _histories(item)]
    return []


def _rebuild(model: Any, feeds: list[Any], layers: dict[str, tuple[Any, Any]]) -> list[Any]:
    """Re-create `model`'s graph in tf_keras on the `feeds` tensors; nested models inline.

    `layers` collects (tf_keras layer, original layer) for the weight copy. Returns the output tensors.
    """
    import keras
    import tf_keras

    config = model.get_config()
    tensors: dict[tuple[str, int], list[Any]] = {}
    input_names = [ref[0] for ref in _histories(_refs(config["input_layers"]))]
    for entry in config["layers"]:
        name, class_name = entry["name"], entry["class_name"]
        original = model.get_layer(name)
        if class_name == "InputLayer":
            tensors[(name, 0)] = [feeds[input_names.index(name)]]
            continue
        for node_index, node in enumerate(entry["inbound_nodes"]):
            refs = _histories(node["args"])
            inputs = [tensors[(ref[0], ref[1])][ref[2]] for ref in refs]
            if isinstance(original, keras.Model):  # a keras.applications base: its layers, inline
                tensors[(name, node_index)] = _rebuild(original, inputs, layers)
                continue
            if node_index == 0:
                cls = getattr(tf_keras.layers, class_name, None)
                if cls is None:
                    raise UnsupportedModel(f"layer {name!r} ({class_name}) has no tf_keras counterpart")
                if name in layers:
                    raise UnsupportedModel(f"two layers are called {name!r} (a nested model repeats it)")
                layers[name] = (cls.from_config(_layer_config(entry["config"])), original)
            output = layers[name][0](inputs[0] if len(inputs) == 1 else inputs)
            tensors[(name, node_index)] = output if isinstance(output, list) else [output]
    return [tensors[(ref[0], ref[1])][ref[2]] for ref in _histories(_refs(config["output_layers"]))]


def _refs(layers: Any) -> list[dict]:
    """input_layers/output_layers ([name, node, index] or a list of them) as keras-tensor references."""
    if layers and isinstance(layers[0], str):
        layers = [layers]
    return [{"class_name": "__keras_tensor__", "config": {"keras_history": list(ref)}} for ref in layers]


def to_tf_keras(model: Any, check: np.ndarray | None = None, tolerance: float = 1e-4) -> Any:
    """The model as tf_keras, with its weights; with `check` images, verified to give the same outputs.

    Raises:
        UnsupportedModel: a layer has no tf_keras counterpart, or the copy answers differently.
    """
    import tf_keras

    feeds = [tf_keras.Input(shape=tuple(t.shape[1:]), name=t.name.split(":")[0]) for t in model.inputs]
    layers: dict[str, tuple[Any, Any]] = {}
    outputs = _rebuild(model, feeds, layers)
    rebuilt = tf_keras.Model(
        feeds[0] if len(feeds) == 1 else feeds, outputs[0] if len(outputs) == 1 else outputs, name=model.name
    )
    for layer, original in layers.values():
        layer.set_weights(original.get_weights())
    if check is not None and len(check):
        ours = np.asarray(rebuilt(check, training=False))
        theirs = np.asarray(model(check, training=False))
        difference = float(np.abs(ours - theirs).max())
        if difference > tolerance:
            raise UnsupportedModel(
                f"the tf_keras copy of {model.name} differs from it by {difference:.2e} (over {tolerance})"
            )
    return rebuilt
