"""The style classifier head, fitted on frozen backbone features, and its calibration."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops

from models.embedding import PROJECTION_LAYER
from models.settings import HeadConfig


def build_head(
    features: np.ndarray, n_classes: int, config: HeadConfig, rows: np.ndarray | None = None
) -> keras.Model:
    """features (`rows` of them, default all) -> logits. The standardisation is fitted here
    and saved with the head, so features of very different scales (pooled activations,
    channel deviations) train well."""
    mean, variance = feature_moments(features, rows)
    inputs = keras.Input((features.shape[1],), name="features")
    x = layers.Normalization(mean=mean, variance=variance + 1e-6)(inputs)
    x = layers.Dropout(config.dropout, seed=config.seed)(x)
    if config.hidden_units:
        x = layers.Dense(config.hidden_units, activation="relu")(x)
        x = layers.Dropout(config.dropout, seed=config.seed + 1)(x)
    regularizer = keras.regularizers.L2(config.l2)
    logits = layers.Dense(n_classes, kernel_regularizer=regularizer, name="logits")(x)
    return keras.Model(inputs, logits, name="style_head")


def feature_moments(
    features: np.ndarray, rows: np.ndarray | None = None, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Each column's mean and variance over `rows` (default: all), accumulated in float64 a
    slice at a time: the features may be a float16 matrix of gigabytes, which a float32 copy
    of the rows chosen would double."""
    rows = np.arange(len(features)) if rows is None else np.sort(rows)
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    for start in range(0, len(rows), chunk):
        part = np.asarray(features[rows[start : start + chunk]], dtype=np.float64)
        total += part.sum(0)
        squares += np.square(part).sum(0)
    mean = total / max(len(rows), 1)
    variance = np.maximum(squares / max(len(rows), 1) - np.square(mean), 0.0)
    return mean.astype(np.float32), variance.astype(np.float32)


@dataclass(frozen=True)
class Rows:
    """Chosen rows of equally wide feature matrices (a split's paintings and their mirrors),
    read a batch at a time as float32: the matrices stay as they are stored (float16) and
    are never concatenated, so fitting holds one copy of the features, not one per fold."""

    matrices: tuple[np.ndarray, ...]
    matrix: np.ndarray  # which matrix each row is in
    row: np.ndarray  # its row there
    labels: np.ndarray  # its class index

    @classmethod
    def of(cls, matrices: tuple[np.ndarray, ...], rows: np.ndarray, labels: np.ndarray) -> Rows:
        """`rows` of every matrix (each painting once per view), with their labels."""
        return cls(
            matrices,
            np.repeat(np.arange(len(matrices)), len(rows)),
            np.tile(rows, len(matrices)),
            np.tile(labels, len(matrices)),
        )

    def __len__(self) -> int:
        return len(self.row)

    def features(self, positions: np.ndarray | slice = slice(None)) -> np.ndarray:
        matrix, row = self.matrix[positions], self.row[positions]
        out = np.empty((len(row), self.matrices[0].shape[1]), np.float32)
        for m, values in enumerate(self.matrices):
            mine = matrix == m
            out[mine] = values[row[mine]]
        return out


class FeatureBatches(keras.utils.PyDataset):
    """Rows in batches for Keras's fit: features, one-hot labels and each row's class weight
    (reshuffled every epoch when `seed` is given; in order otherwise, for predicting)."""

    def __init__(
        self,
        rows: Rows,
        n_classes: int,
        batch_size: int,
        class_weights: np.ndarray | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        self._rows, self._n_classes, self._batch_size = rows, n_classes, batch_size
        self._weights = None if class_weights is None else class_weights[rows.labels]
        self._rng = None if seed is None else np.random.default_rng(seed)
        self._order = np.arange(len(rows))
        self.on_epoch_end()

    def __len__(self) -> int:
        return -(-len(self._rows) // self._batch_size)

    def __getitem__(self, index: int):
        positions = self._order[index * self._batch_size : (index + 1) * self._batch_size]
        positions = np.sort(positions)  # reads each matrix in row order
        x = self._rows.features(positions)
        y = np.eye(self._n_classes, dtype=np.float32)[self._rows.labels[positions]]
        if self._weights is None:
            return x, y
        return x, y, self._weights[positions].astype(np.float32)

    def on_epoch_end(self) -> None:
        if self._rng is not None:
            self._order = self._rng.permutation(len(self._rows))


def class_weights(labels: np.ndarray, n_classes: int, power: float) -> np.ndarray:
    """Each class's weight, (mean count / its count) ** power: 1 weighs every style alike
    whatever its share of the training paintings (what macro scores and a balanced test set
    reward), 0 weighs every painting alike, in between softens the rare styles' boost."""
    counts = np.maximum(np.bincount(labels, minlength=n_classes), 1)
    return (len(labels) / (n_classes * counts)) ** power


def fit_head(
    train: Rows, held_out: Rows, n_classes: int, config: HeadConfig
) -> tuple[keras.Model, int]:
    """Trains on `train` and stops where `held_out` stops improving.

    Returns the head and its epochs.
    """
    keras.utils.set_random_seed(config.seed)
    # The paintings as they are set the standardisation: a mirror's column statistics are
    # the same, so reading the mirrors too would add nothing.
    head = build_head(train.matrices[0], n_classes, config, train.row[train.matrix == 0])
    head.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        metrics=["accuracy"],
    )
    weights = class_weights(train.labels, n_classes, config.class_balance)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True
    )
    history = head.fit(
        FeatureBatches(train, n_classes, config.batch_size, weights, seed=config.seed),
        validation_data=FeatureBatches(held_out, n_classes, PREDICT_BATCH),
        epochs=config.epochs,
        callbacks=[stop],
        verbose=0,
    )
    best_epoch = int(np.argmin(history.history["val_loss"])) + 1
    return head, best_epoch


PREDICT_BATCH = 1024  # rows a head scores at once: a few tens of megabytes of features


def predict_logits(head: keras.Model, features: np.ndarray | Rows) -> np.ndarray:
    """The head's logits for every row, a batch at a time (float16 features are widened one
    batch at a time, never whole)."""
    rows = features if isinstance(features, Rows) else _all_rows(features)
    return np.concatenate(
        [
            np.asarray(head.predict_on_batch(rows.features(slice(i, i + PREDICT_BATCH))))
            for i in range(0, len(rows), PREDICT_BATCH)
        ]
    )


def _all_rows(features: np.ndarray) -> Rows:
    return Rows.of((features,), np.arange(len(features)), np.zeros(len(features), int))


def calibrated_probabilities(logits, temperature: float):
    """softmax(logits / T), a head's calibrated probabilities: what training scores, and the
    softmax of ModelBundle.scores for a bundle without a vote, so the confidence the
    pipeline prints is the one the manifest reports."""
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


def low_rank_head(merged: keras.Model, features: np.ndarray, rank: int) -> keras.Model:
    """`merged` (a two-layer head from merge_heads) with its wide first layer replaced by a
    projection to `rank` numbers and a map back: features -> projection -> hidden -> logits.

    The first layer's kernel holds nearly all of a merged head's weights (features x every
    head's hidden units). Its pre-activations over `features` (a sample of training rows)
    lie close to a subspace of far fewer dimensions; the projection onto that subspace's
    leading directions keeps what the hidden units see there, with the features' mean
    passed through the bias exactly. The projection also gives each painting a short vector
    of what the heads read in it.
    """
    (kernel, bias), (out_kernel, out_bias) = [
        layer.get_weights() for layer in merged.layers if isinstance(layer, layers.Dense)
    ]
    mean = feature_moments(features)[0]
    pre_activations = np.concatenate(
        [
            (np.asarray(features[i : i + PREDICT_BATCH], np.float32) - mean) @ kernel
            for i in range(0, len(features), PREDICT_BATCH)
        ]
    )
    _, _, directions = np.linalg.svd(pre_activations, full_matrices=False)
    basis = directions[:rank].T  # (hidden units, rank)
    projection = kernel @ basis
    inputs = keras.Input(merged.inputs[0].shape[1:], name="features")
    return _dense_model(
        inputs,
        [
            (projection, -mean @ projection, None),
            (basis.T, bias + mean @ kernel, "relu"),
            (out_kernel, out_bias, None),
        ],
        names=(PROJECTION_LAYER, "hidden", "logits"),
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


def _dense_model(
    inputs,
    dense: list[tuple[np.ndarray, np.ndarray, str | None]],
    names: tuple[str, ...] = ("hidden", "logits"),
) -> keras.Model:
    x = inputs
    for name, (kernel, bias, activation) in zip(names[-len(dense) :], dense, strict=True):
        # Initialised at zero, then set: saved with that config, the head then loads without
        # drawing millions of random weights it would overwrite.
        layer = layers.Dense(
            len(bias), activation=activation, kernel_initializer="zeros", name=name
        )
        x = layer(x)
        layer.set_weights([kernel, bias])
    return keras.Model(inputs, x, name="style_head")
