from functools import partial

import apache_beam as beam
import keras
import numpy as np
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from models.fixed_batches import outputs_in_fixed_batches, predict_in_fixed_batches
from transforms.model_handler import FixedBatchModelHandler


def small_model(seed: int = 0) -> keras.Model:
    """A real (small) Keras model: mean colour -> three scores."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))


class CountingModel:
    """Records the batch shapes it is called with."""

    def __init__(self, model):
        self.model = model
        self.shapes = []

    def predict_on_batch(self, batch):
        self.shapes.append(batch.shape)
        return self.model.predict_on_batch(batch)


def test_every_call_has_the_fixed_batch_size_and_padding_changes_nothing():
    images = np.random.default_rng(0).uniform(0, 255, (7, 4, 4, 3)).astype(np.float32)
    model = CountingModel(small_model())
    outputs = predict_in_fixed_batches(model, images, batch_size=3)
    assert [shape[0] for shape in model.shapes] == [3, 3, 3]
    np.testing.assert_allclose(outputs, model.model.predict(images, verbose=0), atol=1e-6)


def test_handler_asks_beam_for_full_batches():
    handler = FixedBatchModelHandler(small_model, batch_size=8)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}
    with pytest.raises(ValueError):
        FixedBatchModelHandler(small_model, batch_size=0)


def test_run_inference_keeps_keys_with_their_predictions():
    images = {f"image{i}": np.full((4, 4, 3), i * 20.0, np.float32) for i in range(5)}
    expected = small_model().predict(np.stack(list(images.values())), verbose=0)
    expected_top = {key: int(np.argmax(row)) for key, row in zip(images, expected, strict=True)}
    handler = KeyedModelHandler(FixedBatchModelHandler(partial(small_model, 0), batch_size=2))
    with TestPipeline() as pipeline:
        top = (
            pipeline
            | beam.Create(list(images.items()))
            | RunInference(handler)
            | beam.MapTuple(lambda key, result: (key, int(np.argmax(result.inference))))
        )
        assert_that(top, equal_to(list(expected_top.items())))


def two_output_model() -> keras.Model:
    """Scores and a unit vector from one pass, as a classifier with embeddings gives them."""
    inputs = keras.Input((4, 4, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    scores = small_model().layers[-1](pooled)
    vector = keras.ops.normalize(keras.layers.Dense(5, name="projection")(pooled), axis=-1)
    return keras.Model(inputs, [scores, vector])


def test_a_model_of_two_outputs_gives_each_image_both():
    images = np.random.default_rng(1).uniform(0, 255, (5, 4, 4, 3)).astype(np.float32)
    model = two_output_model()
    scores, vectors = outputs_in_fixed_batches(model, images, batch_size=2)
    expected_scores, expected_vectors = model.predict(images, verbose=0)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    np.testing.assert_allclose(vectors, expected_vectors, atol=1e-6)

    results = FixedBatchModelHandler(two_output_model, 2).run_inference(list(images), model)
    assert len(results) == 5
    for result, score, vector in zip(results, expected_scores, expected_vectors, strict=True):
        got_score, got_vector = result.inference
        np.testing.assert_allclose(got_score, score, atol=1e-6)
        np.testing.assert_allclose(got_vector, vector, atol=1e-6)
