"""`python -m pipeline --input CATALOG --output DIR`: predict the style of every image."""

import sys

from pipeline import terminal
from pipeline.flags import PREDICT_COMMAND

if __name__ == "__main__":
    PREDICT_COMMAND.answer_help(sys.argv[1:])  # before the pipeline's modules load TensorFlow
    from pipeline.predict import main

    main()
    terminal.end_process()
