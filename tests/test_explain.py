"""`python -m pipeline.explain`: a PNG per image, the layer pictures, and clear errors."""

import numpy as np
import pytest
from PIL import Image

from models.bundle import ModelBundle
from models.feature_maps import MAX_CHANNELS, LayerError, LayerViewer
from pipeline.explain import ExplainError, main, run, unique_names
from pipeline.flags import UsageError
from tests.conftest import CLASSES, COLOURS, painting


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paintings")
    return [str(painting(folder / f"{s}.jpg", COLOURS[s], i)) for i, s in enumerate(CLASSES)]


def picture(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_one_png_per_image_with_the_layer_pictures(images, tiny_bundle, tmp_path):
    run([*images[:2], f"--output={tmp_path}", f"--model={tiny_bundle}",
         "--feature_maps=stem_conv"])  # fmt: skip
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        ["Blue_Period.png", "Green_Period.png", "Blue_Period-stem_conv.png",
         "Green_Period-stem_conv.png", "efficientnet_lite0_stem_conv-filters.png"]
    )  # fmt: skip
    explanation = picture(tmp_path / "Blue_Period.png")
    assert explanation.shape[1] > 2.5 * explanation.shape[0]  # three panels side by side
    for name in names:
        pixels = picture(tmp_path / name)
        assert pixels.std() > 10  # drawn, not blank


def test_style_chooses_the_style_explained(images, tiny_bundle, tmp_path):
    for style in ("Blue_Period", "Red_Period"):
        run([images[1], f"--output={tmp_path / style}", f"--model={tiny_bundle}",
             f"--style={style}"])  # fmt: skip
    blue, red = (
        picture(tmp_path / style / "Green_Period.png") for style in ("Blue_Period", "Red_Period")
    )
    assert blue.shape == red.shape and not np.array_equal(blue, red)


def test_unreadable_images_are_named_and_the_rest_explained(images, tiny_bundle, tmp_path, capsys):
    missing = str(tmp_path / "nowhere.jpg")
    with pytest.raises(ExplainError, match="1 of 2 images could not be read"):
        run([missing, images[2], f"--output={tmp_path / 'out'}", f"--model={tiny_bundle}"])
    assert f"{missing}: not_found" in capsys.readouterr().err
    assert (tmp_path / "out" / "Red_Period.png").is_file()


def test_an_unknown_style_or_layer_is_one_line_and_status_2_before_any_work(
    images, tiny_bundle, tmp_path, monkeypatch, capsys
):
    argv = [images[0], f"--output={tmp_path / 'out'}", f"--model={tiny_bundle}"]
    monkeypatch.setattr("sys.argv", ["explain", *argv, "--style=Rose_Period"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("artstyle: --style: model ") and message.count("\n") == 1
    assert "knows no style 'Rose_Period'; its styles: Blue_Period" in message
    with pytest.raises(UsageError, match="has no layer 'stem'; its convolutions: stem_conv"):
        run([*argv, "--feature_maps=stem"])
    assert not (tmp_path / "out").exists()


def test_layer_pictures_show_filters_where_they_are_spatial(tiny_bundle):
    bundle = ModelBundle.load(tiny_bundle)
    image = np.full((224, 224, 3), 128, np.uint8)
    stem = LayerViewer(bundle, "stem_conv")(image)
    assert stem.filters.shape == (32, 3, 3, 3) and stem.filters_note == "in RGB"
    assert stem.filters.min() >= 0 and stem.filters.max() <= 1
    assert stem.activations.shape == (32, 112, 112) and stem.channels == 32
    depthwise = LayerViewer(bundle, "block3_dwconv")(image)
    assert depthwise.filters.shape == (MAX_CHANNELS, 5, 5, 1)
    pointwise = LayerViewer(bundle, "head_conv")(image)
    assert pointwise.filters is None
    assert pointwise.activations.shape == (MAX_CHANNELS, 7, 7) and pointwise.channels == 1280
    with pytest.raises(LayerError, match="not a backbone of this bundle"):
        LayerViewer(bundle, "efficientnet_lite2/stem_conv")


def test_names_are_file_safe_and_unique():
    uris = ["a/starry night.jpg", "b/starry night.jpg", "https://host/x/Mona.jpg?w=640", "c/"]
    assert unique_names(uris) == ["starry_night", "starry_night-2", "Mona", "c"]
