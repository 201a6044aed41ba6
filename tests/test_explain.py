"""`python -m pipeline.explain`: a PNG per image, the layer pictures, and clear errors."""

import numpy as np
import pytest
from PIL import Image

from models import gradcam
from models.bundle import ModelBundle
from models.feature_maps import MAX_CHANNELS, LayerError, LayerViewer
from models.gradcam import GradCam
from pipeline import figures
from pipeline.explain import MAX_NAME_BYTES, ExplainError, main, output_names, run
from pipeline.flags import UsageError
from tests.conftest import CLASSES, COLOURS, painting
from transforms.images import brief


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


def test_grad_cam_runs_in_batches_of_the_one_size_every_caller_takes(
    images, tiny_bundle, tmp_path, monkeypatch
):
    """explain's batches are models.gradcam's BATCH_SIZE, as the report's step's are."""
    sizes = []
    explain_batch = GradCam.__call__

    def counted(self, batch, styles=None):
        sizes.append(len(batch))
        return explain_batch(self, batch, styles)

    monkeypatch.setattr(GradCam, "__call__", counted)
    monkeypatch.setattr(gradcam, "BATCH_SIZE", 2)
    run([*images, f"--output={tmp_path}", f"--model={tiny_bundle}"])
    assert sizes == [2, 1]


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
    with pytest.raises(ExplainError, match="1 of 2 images could not be explained"):
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


def test_names_are_readable_file_safe_and_short():
    uris = ["a/starry night.jpg", "https://host/x/Mona.jpg?w=640", "c/", "../$\\foo$.jpg",
            "Café.jpg", "", "x/" + "y" * 300 + ".jpg"]  # fmt: skip
    names = output_names(uris)
    assert names[:6] == ["starry_night", "Mona", "c", "foo", "Café", "image"]
    assert names[6] == "y" * MAX_NAME_BYTES


def test_names_never_collide_and_do_not_depend_on_the_order():
    uris = ["../../a.jpg", "../../sub/a.jpg", "../../a-2.jpg", "A.png", "x/" + "y" * 300,
            "z/" + "y" * 301, "b.jpg", "b-stem_conv.jpg", "lite0_stem_conv-filters.jpg",
            "c.jpg", "../../a.jpg"]  # fmt: skip
    suffixes, reserved = ("", "-stem_conv"), ["lite0_stem_conv-filters.png"]
    names = output_names(uris, suffixes, reserved)
    files = [f"{name}{suffix}.png".casefold() for name in set(names) for suffix in suffixes]
    assert len(files) == len(set(files)) and not set(files) & set(reserved)
    assert len(set(names)) == len(set(uris))  # the same URI twice: one name
    assert names[2] == "a-2" and names[9] == "c"  # others' clashes leave them as they are
    assert names[0].startswith("a-") and names[7].startswith("b-stem_conv-")
    assert all(len(name.encode()) < MAX_NAME_BYTES + 20 for name in names)
    assert output_names(uris[::-1], suffixes, reserved) == names[::-1]


def test_each_image_costs_only_its_own_pictures(tiny_bundle, tmp_path, monkeypatch, capsys,
                                                faulty_host):  # fmt: skip
    """Names with mathtext in them, too long for a file, or the same as another's; and a
    picture that cannot be drawn: one line for that image, the others written."""
    folder = tmp_path / "in"
    for i, name in enumerate(["a.jpg", "sub/a.jpg", "a-2.jpg", "a$\\foo$.jpg", "broken.jpg"]):
        painting(folder / name, COLOURS[CLASSES[i % 3]], i)
    long_name = "y" * 300 + ".jpg"
    faulty_host.files[long_name] = (folder / "a.jpg").read_bytes()
    (folder / "x" / "y").mkdir(parents=True)
    monkeypatch.chdir(folder / "x" / "y")
    drawn = figures.explanation_figure

    def draw_unless_broken(*args):
        if "broken" in args[-1]:
            raise RuntimeError("a library's surprise")
        return drawn(*args)

    monkeypatch.setattr(figures, "explanation_figure", draw_unless_broken)
    uris = ["../../a.jpg", "../../sub/a.jpg", "../../a-2.jpg", "../../a$\\foo$.jpg",
            "../../broken.jpg", f"{faulty_host.url}/files/{long_name}"]  # fmt: skip
    with pytest.raises(ExplainError, match="1 of 6 images could not be explained"):
        run([*uris, f"--output={tmp_path / 'out'}", f"--model={tiny_bundle}"])
    out, err = capsys.readouterr()
    written = dict(line.split(" -> ") for line in out.splitlines())
    assert sorted(written) == sorted(map(brief, uris[:4] + uris[5:]))  # as printed
    assert sorted(map(str, (tmp_path / "out").iterdir())) == sorted(written.values())
    assert err.splitlines() == [
        "artstyle: ../../broken.jpg: draw_failed: broken.png: RuntimeError: a library's surprise"
    ]


def test_figures_draw_text_as_written():
    """A report's style names come from a bundle, and may hold a `$` pair too."""
    styles = ["$\\foo$", "Baroque"]
    for picture in (
        figures.confusion_figure(styles, styles, [[1, 0], [0, 1]]),
        figures.style_counts_figure(dict.fromkeys(styles, 2)),
        figures.per_style_figure(
            [{"label": s, "precision": 1, "recall": 1, "f1": 1} for s in styles]
        ),
    ):
        assert picture.startswith(b"\x89PNG")


def test_an_output_that_is_a_file_is_a_usage_error_before_any_work(images, tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(UsageError, match=r"--output: .*out is a file, not a folder"):
        run([images[0], f"--output={tmp_path / 'out'}", "--model=/nowhere"])
