"""Flags: every one known (ours or Beam's), every value checked, each fault one line at start-up."""

import subprocess
import sys
from functools import partial

import pytest
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from pipeline.flags import PREDICT_COMMAND, TRAIN_COMMAND, UsageError
from pipeline.options import (
    ImageOptions,
    PredictOptions,
    parse_options,
    run_command,
)
from pipeline.predict import run


def parse(command, *flags):
    return parse_options(["--input=c.csv", "--output=out", *flags], command)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top_k=0"], "--top_k: must be at least 1, not 0"),
        (["--top_k", "-1"], "--top_k: must be at least 1, not -1"),
        (["--top_k=many"], "--top_k: must be a whole number, not 'many'"),
        (["--batch_size=0"], "--batch_size: must be at least 1, not 0"),
        (["--max_image_pixels=0"], "--max_image_pixels: must be at least 1, not 0"),
        (["--max_image_bytes=-5"], "--max_image_bytes: must be at least 1, not -5"),
        (["--fetch_concurrency=0"], "--fetch_concurrency: must be at least 1, not 0"),
        (["--max_connections_per_host=0"], "--max_connections_per_host: must be at least 1, not 0"),
        (["--max_retries=-1"], "--max_retries: must be at least 0, not -1"),
        (["--fetch_timeout_s=0"], "--fetch_timeout_s: must be above 0, not 0"),
        (["--fetch_timeout_s=nan"], "--fetch_timeout_s: must be above 0, not nan"),
        (["--precision=half"],
         "--precision: invalid choice: 'half' (choose from 'auto', 'float32', 'bfloat16')"),
        (["--top-k", "3"], "unknown flag --top-k (did you mean --top_k?)"),
        (["--top_kk=3"], "unknown flag --top_kk (did you mean --top_k?)"),
        (["--hidden_units=3"], "unknown flag --hidden_units (see --help)"),  # training's
        (["catalog.csv"],
         "unexpected argument 'catalog.csv': flags are written --name=value (see --help)"),
        (["--direct_num_workers=two"], "--direct_num_workers: invalid int value: 'two'"),
        (["--backbone_weights=/no/such/weights.h5"],
         "--backbone_weights: no such file: /no/such/weights.h5"),
    ],
)  # fmt: skip
def test_bad_prediction_flags_are_one_line_errors(flags, message):
    with pytest.raises(UsageError) as error:
        parse(PREDICT_COMMAND, *flags)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--folds=1"], "--folds: must be at least 2, not 1"),
        (["--hidden_units=-1"], "--hidden_units: must be at least 0, not -1"),
        (["--dropout=1"], "--dropout: must be at least 0 and below 1, not 1"),
        (["--label_smoothing=-0.1"], "--label_smoothing: must be at least 0 and below 1, not -0.1"),
        (["--l2=-1e-4"], "--l2: must be at least 0, not -1e-4"),
        (["--learning_rate=0"], "--learning_rate: must be above 0, not 0"),
        (["--epochs=0"], "--epochs: must be at least 1, not 0"),
        (["--seed=-1"], "--seed: must be at least 0, not -1"),
        (["--backbone=vgg"], "--backbone: Unknown backbone 'vgg'; known: "),
        (["--feature_kind=gram"], "--feature_kind: invalid choice: 'gram'"),
        (["--top_k=3"], "unknown flag --top_k (see --help)"),  # prediction's
    ],
)
def test_bad_training_flags_are_one_line_errors(flags, message):
    with pytest.raises(UsageError) as error:
        parse(TRAIN_COMMAND, *flags)
    assert str(error.value).startswith(message)


def test_beams_own_flags_are_accepted_beside_ours():
    options = parse(PREDICT_COMMAND, "--runner=DirectRunner", "--direct_num_workers=2",
                    "--direct_running_mode=multi_processing", "--temp_location=/tmp/beam",
                    "--user_agent=someone@example.org", "--experiments=a", "--experiments=b",
                    "--top_k=3", "--fetch_timeout_s=2.5")  # fmt: skip
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    assert options.view_as(DirectOptions).direct_num_workers == 2
    assert options.view_as(PredictOptions).top_k == 3
    assert options.view_as(ImageOptions).fetch_timeout_s == 2.5


def test_the_command_line_says_it_in_one_line_before_any_work(tmp_path):
    """End to end: with --verbose, any line of TensorFlow's or Beam's would show that they
    had loaded; there is none, and no output folder."""
    cli = subprocess.run(
        [sys.executable, "-m", "pipeline", f"--input={tmp_path / 'c.csv'}",
         f"--output={tmp_path / 'out'}", "--top-k", "3", "--verbose"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert cli.returncode == 2
    assert cli.stderr == "artstyle: unknown flag --top-k (did you mean --top_k?)\n"
    assert not (tmp_path / "out").exists()


def test_an_entry_point_prints_one_line_and_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_command(partial(run, [f"--input={tmp_path}", f"--output={tmp_path}", "--top_k=0"]))
    assert stop.value.code == 2
    assert capsys.readouterr().err == "artstyle: --top_k: must be at least 1, not 0\n"
