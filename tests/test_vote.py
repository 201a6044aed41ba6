"""The training paintings' vote: who votes, how the votes count, what the file keeps."""

import keras
import numpy as np
import pytest
from keras.ops import softmax

from models.settings import VoteConfig
from models.vote import TrainingVote, VoteError

N_CLASSES = 3


def clusters(per_class: tuple[int, ...], seed: int = 0, width: int = 40) -> tuple:
    """Features of paintings in tight clusters, one cluster a style, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (len(per_class), width))
    labels = np.repeat(np.arange(len(per_class)), per_class)
    features = centres[labels] + rng.normal(0, 0.3, (len(labels), width))
    return features.astype(np.float32), labels


def fitted(features, labels, **config) -> TrainingVote:
    settings = VoteConfig(**{"voters": 5, "dimension": 8, **config})
    return TrainingVote.fitted(features, labels, N_CLASSES, settings)


def test_a_painting_gets_the_style_of_the_training_paintings_nearest_it():
    features, labels = clusters((10, 10, 10))
    vote = fitted(features, labels)
    queries, query_labels = clusters((2, 2, 2))  # the same clusters (seed), new paintings
    votes = np.asarray(vote.votes(queries))
    np.testing.assert_allclose(votes.sum(axis=1), 1.0, rtol=1e-6)
    assert (votes.argmax(axis=1) == query_labels).all()
    assert votes.max(axis=1).min() > 0.5


def test_a_style_does_not_win_by_its_numbers_alone():
    """Three nearest of a style of six paintings weigh what one of a style of two does."""
    features, _ = clusters((4, 4))
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    vote = TrainingVote.fitted(features, labels, 2, VoteConfig(voters=4, dimension=2))
    nearest = np.array([[0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.9, 0.1]], np.float32)  # similarities
    np.testing.assert_allclose(vote.votes_from(nearest), [[0.5, 0.5]], atol=1e-6)


def test_a_training_paintings_vote_comes_from_the_others_only():
    """Five lone paintings, each with its twin of another style: a painting's vote from the
    others is its twin's style, not its own."""
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 5, (5, 20))
    features = np.concatenate([centres, centres + 0.01]).astype(np.float32)
    labels = np.array([0] * 5 + [1] * 5)
    vote = TrainingVote.fitted(features, labels, 2, VoteConfig(voters=1, dimension=4))
    assert (np.asarray(vote.left_out_votes()).argmax(axis=1) == 1 - labels).all()


def test_calibration_and_the_mixture():
    features, labels = clusters((12, 12, 12), seed=3)
    vote = fitted(features, labels, weight=0.5)
    unsure = np.full(
        (len(labels), N_CLASSES), 1 / N_CLASSES, np.float32
    )  # a head that knows nothing
    calibrated = vote.calibrated(unsure, vote.left_out_votes(), labels)
    assert calibrated.temperature < 1.0  # the votes are right: the mixture grows surer
    mixed = np.asarray(softmax(calibrated.scores(unsure, features)))
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, rtol=1e-6)
    assert (mixed.argmax(axis=1) == labels).all()
    head_alone = np.asarray(softmax(fitted(features, labels, weight=0.0).scores(unsure, features)))
    np.testing.assert_allclose(head_alone, unsure, atol=1e-6)


def test_it_votes_alike_in_a_keras_model_and_on_arrays():
    features, labels = clusters((6, 6, 6))
    vote = fitted(features, labels)
    inputs = keras.Input((features.shape[1],))
    model = keras.Model(inputs, vote.votes(inputs))
    np.testing.assert_allclose(model.predict_on_batch(features), vote.votes(features), atol=1e-6)


def test_saved_and_loaded_it_votes_as_fitted(tmp_path):
    features, labels = clusters((6, 6, 6))
    vote = fitted(features, labels)
    vote.save(str(tmp_path / "vote.npz"))
    loaded = TrainingVote.load(str(tmp_path / "vote.npz"))
    assert (loaded.voters, loaded.weight, loaded.n_classes) == (5, vote.weight, N_CLASSES)
    assert loaded.vectors.shape == (18, vote.dimension)
    np.testing.assert_allclose(loaded.vectors, vote.vectors, atol=1e-6)  # fitted as stored
    np.testing.assert_allclose(loaded.votes(features), vote.votes(features), atol=2e-3)


@pytest.mark.parametrize(
    "damage, message",
    [
        (None, "is missing"),
        (b"not a zip", "is not a readable vote file"),
        ({"labels": np.array([0, 1], np.int16)}, "labels, vectors and count of voters"),
        ({"labels": np.full(18, 7, np.int16)}, "class indices below 3"),
        ({"weight": np.asarray(1.5)}, "weight within 0..1"),
    ],
)
def test_a_broken_file_is_one_line_naming_it(tmp_path, damage, message):
    features, labels = clusters((6, 6, 6))
    path = tmp_path / "vote.npz"
    if damage is not None:
        fitted(features, labels).save(str(path))
        if isinstance(damage, bytes):
            path.write_bytes(damage)
        else:
            saved = dict(np.load(path))
            np.savez(path, **{**saved, **damage})
    with pytest.raises(VoteError, match=message) as error:
        TrainingVote.load(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
