"""A painting's fingerprint: the part of its embedding that finds the same picture again,
scanned twice, cropped, framed, rotated or re-encoded.

The style part of the embedding (the head's projection) places paintings by style, and an
altered copy of a painting can move in it as far as another painting of that style is
(docs/similar.md). What the backbones see before the head moves little under such
alterations and differs from one picture to the next: the fingerprint is made of each
backbone's last feature map, averaged without its outer ring of cells (where frames and
rotations fall; models.backbones.centre_pooled). Each backbone's average is square-rooted
(they are averages of non-negative activations; the root evens out the few large ones) and
brought to unit length, then whitened: projected on their principal directions over
training paintings, each scaled to unit variance, so that no few directions shared by
whole styles outweigh the many that tell two pictures apart. Fitted at training time on a
sample of the training paintings, and kept in the bundle beside the head.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

FINGERPRINT_FILE = "fingerprint.npz"
# What a fingerprint file's whitening was fitted on, as the file says: a file fitted on
# another source (an earlier version's, of the whole maps' averages) whitens the wrong numbers.
SOURCE = "centre_pooled_last_maps"
# A direction of the training paintings' features with less variance than this share of the
# largest has none to speak of (a small training set has fewer directions than asked).
NEGLIGIBLE_VARIANCE = 1e-6
SOURCE_CHUNK = 4096  # rows rooted and scaled at a time, when fitting


class FingerprintError(ValueError):
    """A fingerprint file that cannot be read or does not fit its bundle."""


@dataclass(frozen=True)
class Fingerprint:
    """The whitening of the fingerprint source: where each backbone's part is in it
    (`columns`, each [start, stop)), its mean over the training paintings it was fitted on
    (`paintings` of them), and the (source width x dimension) matrix onto the scaled
    principal directions."""

    columns: tuple[tuple[int, int], ...]
    mean: np.ndarray
    matrix: np.ndarray
    paintings: int

    @property
    def dimension(self) -> int:
        return int(self.matrix.shape[1])

    @classmethod
    def fitted(
        cls, sources: np.ndarray, columns: list[tuple[int, int]], dimension: int
    ) -> Fingerprint:
        """Fitted on `sources` (training paintings', as `feature_extractor` gives them): at
        most `dimension` directions, fewer where the paintings span fewer."""
        source = np.concatenate(
            [
                np.asarray(source_of(sources[start : start + SOURCE_CHUNK], columns))
                for start in range(0, len(sources), SOURCE_CHUNK)
            ]
        ).astype(np.float64)
        mean = source.mean(axis=0)
        centred = source - mean
        variances, directions = np.linalg.eigh(centred.T @ centred / max(len(source), 1))
        order = np.argsort(variances)[::-1][:dimension]
        order = order[variances[order] > NEGLIGIBLE_VARIANCE * max(variances.max(), 1e-30)]
        matrix = directions[:, order] / np.sqrt(variances[order])
        return cls(tuple(columns), mean.astype(np.float32), matrix.astype(np.float32), len(source))

    def save(self, path: str) -> None:
        """As float16 (half the bytes; a fingerprint is compared after scaling to unit
        length, which the rounding does not move measurably)."""
        with fsspec.open(path, "wb") as file:
            np.savez(
                file,
                source=np.asarray(SOURCE),
                paintings=np.asarray(self.paintings, np.int64),
                columns=np.asarray(self.columns, np.int64),
                mean=self.mean.astype(np.float16),
                matrix=self.matrix.astype(np.float16),
            )

    @classmethod
    def load(cls, path: str) -> Fingerprint:
        """Reads a saved fingerprint; FingerprintError names the file where it cannot."""
        try:
            with fsspec.open(path, "rb") as file, np.load(file, allow_pickle=False) as saved:
                source = str(saved["source"]) if "source" in saved else "whole maps' averages"
                if source == SOURCE:
                    columns, mean, matrix = saved["columns"], saved["mean"], saved["matrix"]
                    paintings = int(saved["paintings"])
        except FileNotFoundError:
            raise FingerprintError(f"{path} is missing") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise FingerprintError(f"{path} is not a readable fingerprint ({error})") from None
        if source != SOURCE:
            raise FingerprintError(f"{path} whitens {source}, not {SOURCE}: train the bundle again")
        width = int(sum(stop - start for start, stop in columns))
        if (
            columns.ndim != 2
            or columns.shape[1] != 2
            or mean.shape != (width,)
            or (matrix.ndim != 2 or matrix.shape[0] != width)
        ):
            raise FingerprintError(f"{path}: its columns, mean and matrix do not agree")
        pairs = tuple((int(start), int(stop)) for start, stop in columns)
        return cls(pairs, mean.astype(np.float32), matrix.astype(np.float32), paintings)

    def of(self, sources: Any) -> Any:
        """Fingerprint sources (a batch, NumPy or Keras tensors) -> their fingerprints, unit
        vectors."""
        from keras import ops

        whitened = ops.matmul(source_of(sources, self.columns) - self.mean, self.matrix)
        return ops.normalize(whitened, axis=-1, order=2)


def source_of(features: Any, columns: Any) -> Any:
    """What the fingerprint whitens: each backbone's pooled map (at `columns` of `features`),
    square-rooted and at unit length, side by side (float32)."""
    from keras import ops

    parts = [
        ops.normalize(
            ops.sqrt(ops.maximum(ops.cast(features[:, start:stop], "float32"), 0.0)),
            axis=-1,
            order=2,
        )
        for start, stop in columns
    ]
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)
