"""Grad-CAM (Selvaraju et al. 2017): where in a painting the evidence for a style lies.

## The algorithm

The classifier is split in two at the feature maps its head reads: stage one takes images
to those maps (each backbone's last map and, for stage features, its stage outputs);
stage two takes the maps to the head's logits (the maps' statistics, then the head). For
the chosen style's logit y and each map A of C channels over P positions:

1. the gradient of y with respect to A, taken in stage two only;
2. each channel's weight: that gradient averaged over the positions of one image (per
   image, never across the batch, so a batch's maps equal the one-image maps);
3. the map's evidence: P times the weighted sum of its channels, per position;
4. every map's evidence resized to the image and summed, over maps and backbones; the
   positive part, divided by its maximum, per image: a heatmap in 0..1.

Splitting at the maps, rather than building one gradient model through the backbones
nested inside the classifier (which Keras refuses: "Graph disconnected"), also makes
each map's gradient the direct one, through the statistic the head reads of it and not
again through the later layers: the maps' shares add up without counting twice. Step 3's
factor P makes each map a density per unit of image area, so maps of different
resolution sum fairly: averaged over the image, the sum before the ReLU is the first
order share of the logit carried by the maps' channel means. The channel deviations and
covariances the head also reads are statistics of centred maps: their gradients average
to zero over positions, so Grad-CAM's averaged weights do not see them.

Grad-CAM always computes in float32, even where prediction runs the backbone in bfloat16:
gradients of rounded activations are noise at the resolution of a heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import matplotlib
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models.backbones import Backbone, backbones_of, feature_extractor, feature_layers, resized
from models.bundle import ModelBundle
from models.precision import building_in

OVERLAY_COLOURMAP = "turbo"
OVERLAY_OPACITY = 0.45
# Images per Grad-CAM call, for callers that explain many (the report's step, explain): enough
# to amortise a call's fixed cost, little memory beside the float32 model's.
BATCH_SIZE = 16


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM of a batch of images, each for one style."""

    heatmaps: np.ndarray  # (n, size, size) float32 in 0..1: where the evidence for `styles` is
    styles: np.ndarray  # (n,) the class index each heatmap explains
    scores: np.ndarray  # (n, classes) the model's scores: their softmax is its probabilities


class GradCam:
    """Grad-CAM of a classifier given in two stages: images -> feature maps -> scores.

    `maps`: images (n, size, size, 3) -> a list of feature maps (n, h, w, c), any sizes;
    `head`: that list -> scores (n, classes), whose softmax is the probabilities. The head
    must treat each image on its own (no batch statistics), as every inference-mode Keras
    model does.
    """

    def __init__(self, maps: keras.Model, head: keras.Model):
        self.maps = maps
        self.head = head
        self.size = int(maps.input.shape[1])

    def __call__(self, images: np.ndarray, styles: np.ndarray | None = None) -> Explanation:
        """Heatmaps of `images` (0..255) for `styles` (class indices; default: each image's
        top style)."""
        feature_maps = self.maps(tf.convert_to_tensor(images, tf.float32))
        if not isinstance(feature_maps, list | tuple):  # a model of one output returns it bare
            feature_maps = [feature_maps]
        feature_maps = list(feature_maps)
        with tf.GradientTape() as tape:
            tape.watch(feature_maps)
            scores = self.head(feature_maps)
            if styles is None:
                styles = np.argmax(scores.numpy(), axis=-1)
            styles = np.asarray(styles, dtype="int64")
            # Each image's score depends on its own maps only, so the gradient of the
            # batch's sum is, image by image, the gradient of that image's score.
            chosen = tf.gather(scores, styles, batch_dims=1)
        gradients = tape.gradient(chosen, feature_maps)
        evidence = sum(
            self._evidence(feature_map, gradient)
            for feature_map, gradient in zip(feature_maps, gradients, strict=True)
        )
        return Explanation(_unit_heatmaps(evidence), styles, scores.numpy())

    def _evidence(self, feature_map: tf.Tensor, gradient: tf.Tensor) -> tf.Tensor:
        """One map's share of the logit per image position, resized to the image."""
        positions = feature_map.shape[1] * feature_map.shape[2]
        weights = tf.reduce_mean(gradient, axis=(1, 2))  # (n, c): per image
        share = positions * tf.einsum("nhwc,nc->nhw", feature_map, weights)
        resized_share = ops.image.resize(
            share[..., None], (self.size, self.size), interpolation="bilinear"
        )
        return resized_share[..., 0]


def _unit_heatmaps(evidence: tf.Tensor) -> np.ndarray:
    """The positive evidence of each image, divided by its own maximum (all 0 if none)."""
    positive = np.maximum(np.asarray(evidence, dtype="float32"), 0.0)
    peaks = positive.max(axis=(1, 2), keepdims=True)
    return np.divide(positive, peaks, out=np.zeros_like(positive), where=peaks > 0)


def bundle_grad_cam(bundle: ModelBundle, backbone_weights: str | None = None) -> GradCam:
    """Grad-CAM of a bundle's classifier: its backbones and head (with the training
    paintings' vote, where the bundle has one), split at the feature maps.

    Built from the same feature extractor, head and scores as `ModelBundle.classifier`,
    always in float32: the softmax of its Explanation's scores are the classifier's
    probabilities, and a heatmap shows where the evidence for a style's score lies.
    """
    spec = bundle.manifest.backbone
    with building_in("float32"):
        head = bundle.load_head()  # first: a head Keras refuses costs no backbone's building
        extractor = feature_extractor(
            spec.name, spec.feature_kind, weights=spec.weights, weights_path=backbone_weights
        )
        vote = bundle.load_vote()
        bundle.check_features(head, extractor.output, vote)
        features = head.inputs[0]
        scores = keras.Model(features, bundle.scores(head(features), features, vote))
        return split_at_feature_maps(extractor, scores, backbones_of(spec.name), spec.feature_kind)


def split_at_feature_maps(
    extractor: keras.Model, head: keras.Model, backbones: list[Backbone], feature_kind: str
) -> GradCam:
    """The two stages of `head(extractor(images))` (`head`: features -> scores), cut at the
    maps each backbone's features are computed from (see models.backbones.backbone_features,
    which names those models)."""
    images = extractor.input
    maps, head_inputs, vectors = [], [], []
    for backbone in backbones:
        backbone_model = extractor.get_layer(f"{backbone.name}_{feature_kind}")
        names = feature_layers(backbone, feature_kind)
        tapped = [backbone_model.get_layer(name).output for name in names]
        to_maps = keras.Model(backbone_model.input, tapped)
        to_vector = keras.Model(tapped, backbone_model.output)
        maps += to_maps(resized(images, backbone.input_size))
        inputs = [
            keras.Input(t.shape[1:], name=f"{backbone.name}_{name}")
            for name, t in zip(names, tapped, strict=True)
        ]
        head_inputs += inputs
        vectors.append(to_vector(inputs))
    vector = vectors[0] if len(vectors) == 1 else layers.Concatenate(name="ensemble")(vectors)
    return GradCam(
        keras.Model(images, maps, name="feature_maps"),
        keras.Model(head_inputs, head(vector), name="scores_of_feature_maps"),
    )


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The image (uint8 RGB) with the heatmap (0..1, same height and width) over it."""
    colours = matplotlib.colormaps[OVERLAY_COLOURMAP](heatmap)[..., :3] * 255.0
    blended = (1 - OVERLAY_OPACITY) * image.astype("float32") + OVERLAY_OPACITY * colours
    return np.clip(np.rint(blended), 0, 255).astype("uint8")
