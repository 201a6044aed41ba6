"""`python -m pipeline --input CATALOG --output DIR`: predict the style of every image."""

from pipeline.predict import main

if __name__ == "__main__":
    main()
