"""The style classifier head, fitted on frozen backbone features, and its calibration."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import numpy as np
from keras import layers, ops


@dataclass(frozen=True)
class HeadConfig:
    # The defaults are the shipped model's: chosen on a fold held out of WikiArt's train split.
    hidden_units: int = 256  # 0: a linear (multinomial logistic) head
    dropout: float = 0.6
    l2: float = 1e-4
    label_smoothing: float = 0.1
    learning_rate: float = 1e-3
    epochs: int = 600
    batch_size: int = 128
    patience: int = 10
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


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


def average_heads(heads: list[keras.Model]) -> keras.Model:
    """One head whose logits are the mean of `heads`' logits (two or more): the bundle keeps
    one head file and the pipeline one model call, however many heads were fitted."""
    inputs = keras.Input(heads[0].inputs[0].shape[1:], name="features")
    members = [
        keras.Model(h.inputs[0], h.outputs[0], name=f"member_{i}") for i, h in enumerate(heads)
    ]
    logits = [member(inputs) for member in members]
    return keras.Model(inputs, layers.Average(name="logits")(logits), name="style_head")
