import json

import pytest

from models.engine_choice import EngineChoice
from models.metrics import Scoreboard
from models.precision import PrecisionChoice
from transforms.evaluation import RunSummary

CLASSES = ("A", "B", "C")


def hand_checked_board() -> Scoreboard:
    """Seven rows whose scores are worked out by hand in the tests below."""
    board = Scoreboard(CLASSES)
    board.add("A", ["A", "B", "C"], 0.9)  # right
    board.add("A", ["B", "A", "C"], 0.6)  # wrong, in top 3
    board.add("B", ["B", "C", "A"], 0.8)  # right
    board.add("C", ["A", "B", "C"], 0.7)  # wrong, in top 3
    board.add("D", ["A", "B", "C"], 0.5)  # a label the model does not know
    board.add("A", None, None, error="not_found: no such file")
    board.add(None, ["C", "A", "B"], 0.4)  # unlabelled
    return board


def test_overall_scores_match_the_hand_count():
    summary = hand_checked_board().scores()
    assert summary.n_images == 7
    assert summary.n_errors == 1
    assert summary.errors_by_kind == {"not_found": 1}
    assert summary.n_labelled == 4
    assert summary.top1 == pytest.approx(2 / 4)
    assert summary.top3 == pytest.approx(4 / 4)
    assert summary.top5 is None  # rows ranked only three styles
    assert summary.n_unknown_label == 1
    assert summary.unknown_labels == {"D": 1}


def test_per_class_scores_and_macro_f1():
    board = hand_checked_board()
    per_class = {row["label"]: row for row in board.per_class()}
    assert per_class["A"] == pytest.approx(
        {"label": "A", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert per_class["B"]["precision"] == pytest.approx(0.5)
    assert per_class["B"]["recall"] == pytest.approx(1.0)
    assert per_class["B"]["f1"] == pytest.approx(2 / 3)
    assert per_class["C"]["f1"] == 0.0
    assert board.macro_f1() == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def test_calibration_error_is_the_weighted_confidence_gap():
    # Bins hold one row each: |1-0.9| + |0-0.6| + |1-0.8| + |0-0.7| over 4 rows.
    assert hand_checked_board().expected_calibration_error() == pytest.approx(1.6 / 4)


def test_confusion_keeps_unknown_labels():
    confusion = hand_checked_board().confusion
    assert confusion[("A", "A")] == 1
    assert confusion[("A", "B")] == 1
    assert confusion[("D", "A")] == 1
    assert sum(confusion.values()) == 5


def test_merged_boards_equal_one_board_over_all_rows():
    whole = hand_checked_board()
    first, second = Scoreboard(CLASSES), Scoreboard(CLASSES)
    first.add("A", ["A", "B", "C"], 0.9)
    first.add("A", ["B", "A", "C"], 0.6)
    first.add("B", ["B", "C", "A"], 0.8)
    second.add("C", ["A", "B", "C"], 0.7)
    second.add("D", ["A", "B", "C"], 0.5)
    second.add("A", None, None, error="not_found: no such file")
    second.add(None, ["C", "A", "B"], 0.4)
    first.merge(second)
    assert first.scores() == whole.scores()


def test_probabilities_are_ranked_like_rows():
    import numpy as np

    board = Scoreboard(CLASSES)
    board.add_probabilities(["B", "C"], np.array([[0.2, 0.7, 0.1], [0.5, 0.3, 0.2]]))
    summary = board.scores()
    assert summary.top1 == pytest.approx(0.5)
    assert summary.top3 == pytest.approx(1.0)


def test_a_runs_summary_reads_back_as_written_and_an_older_one_without_its_engine():
    board = hand_checked_board()
    summary = RunSummary(
        **vars(board.scores()),
        model_id="m",
        engine=EngineChoice("openvino", "asked for (--engine openvino)"),
        precision=PrecisionChoice("float32", "asked for (--precision float32)"),
    )
    written = json.loads(json.dumps(summary.to_json()))
    assert written["model"] == "m" and written["engine"]["engine"] == "openvino"
    assert RunSummary.from_json(written) == summary
    del written["engine"], written["precision"]
    older = RunSummary.from_json(written)
    assert older.engine is None and older.precision is None and older.top1 == summary.top1


def test_a_summary_without_labelled_rows_has_no_scores():
    board = Scoreboard(("A", "B"))
    board.add(None, ["A", "B"], 0.9)
    assert "top1" not in board.scores().to_json() and board.scores().top1 is None
