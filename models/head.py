"""The style classifier head, fitted on frozen backbone features, and its calibration."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from models.settings import HeadConfig


def build_head(features: np.ndarray, n_classes: int, config: HeadConfig) -> keras.Model:
    """features -> logits. The standardisation is fitted here and saved with the head, so
    features of very different scales (pooled activations, channel deviations) train well."""
    inputs = keras.Input((features.shape[1],), name="features")
    x = layers.Normalization(mean=features.mean(0), variance=features.var(0) + 1e-6)(inputs)
    x = layers.Dropout(config.dropout, seed=config.seed)(x)
    if config.hidden_units:
        x = layers.Dense(config.hidden_units, activation="relu")(x)
        x = layers.Dropout(config.dropout, seed=config.seed + 1)(x)
    regularizer = keras.regularizers.L2(config.l2)
    logits = layers.Dense(n_classes, kernel_regularizer=regularizer, name="logits")(x)
    return keras.Model(inputs, logits, name="style_head")


def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_fold: np.ndarray,
    y_fold: np.ndarray,
    n_classes: int,
    config: HeadConfig,
) -> tuple[keras.Model, int]:
    """Trains on x_train and stops where the held-out fold stops improving.

    Classes are weighted by inverse frequency: the catalog's styles are not balanced, the
    scores we report (macro F1) weigh every style alike. Returns the head and its epochs.
    """
    keras.utils.set_random_seed(config.seed)
    head = build_head(x_train, n_classes, config)
    head.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        metrics=["accuracy"],
    )
    counts = np.bincount(y_train, minlength=n_classes)
    class_weight = {c: len(y_train) / (n_classes * max(n, 1)) for c, n in enumerate(counts)}
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True
    )
    history = head.fit(
        x_train,
        keras.utils.to_categorical(y_train, n_classes),
        validation_data=(x_fold, keras.utils.to_categorical(y_fold, n_classes)),
        epochs=config.epochs,
        batch_size=config.batch_size,
        class_weight=class_weight,
        callbacks=[stop],
        verbose=0,
    )
    best_epoch = int(np.argmin(history.history["val_loss"])) + 1
    return head, best_epoch


def calibrated_probabilities(logits, temperature: float):
    """softmax(logits / T): the bundle's classifier and training's scores share this one
    definition, so the confidence the pipeline prints is the one the manifest reports."""
    return ops.softmax(logits / temperature, axis=-1)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T).

    Label smoothing and regularisation leave a head under- or over-confident; one scalar
    fitted on held-out data fixes calibration without changing any ranking.
    """
    temperatures = np.exp(np.linspace(np.log(0.2), np.log(5.0), 400))
    losses = [_negative_log_likelihood(logits / t, labels) for t in temperatures]
    return float(temperatures[int(np.argmin(losses))])


def _negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def check_fold_count(n_folds: int) -> None:
    """Cross-fitting needs one fold to stop each head on and at least one other to train it."""
    if n_folds < 2:
        raise ValueError(
            f"Cross-fitting needs at least 2 folds (--folds must be at least 2), got {n_folds}"
        )


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Each sample's fold, 0..n_folds-1, every class dealt round-robin across the folds."""
    check_fold_count(n_folds)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=int)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = np.arange(len(members)) % n_folds
    return folds


def merge_heads(heads: list[keras.Model]) -> keras.Model:
    """One two-layer head whose logits are the mean of `heads`' logits, for heads built by
    build_head with one configuration.

    Each head's standardisation is folded into its first dense layer; linear heads then
    average into one; MLP heads' hidden layers sit side by side (ReLU acts on each unit
    alone) and their output layers stack, divided by the head count. The bundle keeps one
    small model: it loads and traces as fast as one head, however many were fitted.
    """
    weights = [_standardisation_folded(head) for head in heads]
    if len({len(w) for w in weights}) != 1:
        raise ValueError("merge_heads needs heads of one configuration (all linear or all MLP)")
    inputs = keras.Input(heads[0].inputs[0].shape[1:], name="features")
    if len(weights[0]) == 1:  # linear heads: the mean of affine maps is an affine map
        kernel = np.mean([w[0][0] for w in weights], 0)
        bias = np.mean([w[0][1] for w in weights], 0)
        return _dense_model(inputs, [(kernel, bias, None)])
    hidden_kernel = np.concatenate([w[0][0] for w in weights], axis=1)
    hidden_bias = np.concatenate([w[0][1] for w in weights])
    output_kernel = np.concatenate([w[1][0] for w in weights]) / len(heads)
    output_bias = np.mean([w[1][1] for w in weights], 0)
    return _dense_model(
        inputs, [(hidden_kernel, hidden_bias, "relu"), (output_kernel, output_bias, None)]
    )


def _standardisation_folded(head: keras.Model) -> list[tuple[np.ndarray, np.ndarray]]:
    """A head's dense (kernel, bias) pairs, the first taking raw features: ((x - m) / s) K + b
    is x (K / s) + (b - (m / s) K), with K / s dividing each row of K by its feature's s."""
    (normalization,) = [layer for layer in head.layers if isinstance(layer, layers.Normalization)]
    mean = np.asarray(normalization.mean).reshape(-1)
    scale = np.maximum(
        np.sqrt(np.asarray(normalization.variance).reshape(-1)), keras.config.epsilon()
    )
    dense = [layer.get_weights() for layer in head.layers if isinstance(layer, layers.Dense)]
    (kernel, bias), rest = dense[0], dense[1:]
    first = (kernel / scale[:, None], bias - (mean / scale) @ kernel)
    return [first] + [(k, b) for k, b in rest]


def _dense_model(inputs, dense: list[tuple[np.ndarray, np.ndarray, str | None]]) -> keras.Model:
    x = inputs
    for i, (kernel, bias, activation) in enumerate(dense):
        last = i == len(dense) - 1
        # Initialised at zero, then set: saved with that config, the head then loads without
        # drawing millions of random weights it would overwrite.
        layer = layers.Dense(
            len(bias),
            activation=activation,
            kernel_initializer="zeros",
            name="logits" if last else "hidden",
        )
        x = layer(x)
        layer.set_weights([kernel, bias])
    return keras.Model(inputs, x, name="style_head")
