"""Makes docs/report.png: the report of a run of the shipped model over made-up pictures.

The picture is made, not kept in the repository. The screenshot shows a run
over pictures drawn here, each in the manner of a style (dots for Pointillism, flat fields
for Minimalism, ...) and labelled with it. The numbers on it are that run's, not the
model's accuracy on paintings (README's "Accuracy" has those).

    python docs/report_screenshot.py [--work /tmp/artstyle-docs]

Needs Debian's chromium. Takes a minute on two cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

SIZE = 320
PER_STYLE = 6
WINDOW = (1280, 3500)  # down to the first confident mistakes; scaled to SHOWN_WIDTH
SHOWN_WIDTH = 900


def pointillism(rng, draw):
    draw.rectangle((0, 0, SIZE, SIZE), fill=tuple(rng.integers(200, 250, 3)))
    palette = rng.integers(30, 255, (5, 3))
    for _ in range(2500):
        x, y = rng.integers(0, SIZE, 2)
        draw.ellipse((x, y, x + 5, y + 5), fill=tuple(palette[rng.integers(5)]))


def minimalism(rng, draw):
    cuts = np.sort(rng.integers(40, SIZE - 40, 2))
    for top, bottom in ((0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], SIZE)):
        draw.rectangle((0, top, SIZE, bottom), fill=tuple(rng.integers(0, 255, 3)))


def abstract_expressionism(rng, draw):
    draw.rectangle((0, 0, SIZE, SIZE), fill=tuple(rng.integers(0, 255, 3)))
    for _ in range(40):
        points = [tuple(p) for p in rng.integers(-40, SIZE + 40, (3, 2))]
        draw.line(points, fill=tuple(rng.integers(0, 255, 3)), width=int(rng.integers(6, 30)))


def cubism(rng, draw):
    for _ in range(60):
        points = [tuple(p) for p in rng.integers(0, SIZE, (4, 2))]
        shade = rng.integers(60, 200)
        draw.polygon(
            points, fill=(shade, int(shade * 0.85), int(shade * 0.6)), outline=(30, 25, 20)
        )


def pop_art(rng, draw):
    background = tuple(int(c) for c in rng.choice([[255, 230, 0], [0, 160, 230], [230, 30, 60]]))
    draw.rectangle((0, 0, SIZE, SIZE), fill=background)
    for x in range(0, SIZE, 12):
        for y in range(0, SIZE, 12):
            draw.ellipse((x, y, x + 6, y + 6), fill=(240, 60, 80))
    x, y = rng.integers(40, 140, 2)
    draw.ellipse((x, y, x + 150, y + 150), fill=(255, 255, 255), outline=(0, 0, 0), width=8)


def impressionism(rng, draw):
    draw.rectangle((0, 0, SIZE, SIZE), fill=(150, 190, 220))
    for _ in range(1500):
        x, y = rng.integers(0, SIZE, 2)
        green = (
            int(rng.integers(60, 150)),
            int(rng.integers(140, 220)),
            int(rng.integers(60, 140)),
        )
        sky = (
            int(rng.integers(180, 255)),
            int(rng.integers(190, 240)),
            int(rng.integers(200, 255)),
        )
        colour = green if y > SIZE / 2 else sky
        draw.line(
            (x, y, x + int(rng.integers(4, 12)), y + int(rng.integers(-3, 3))), fill=colour, width=3
        )


def baroque(rng, draw):
    draw.rectangle((0, 0, SIZE, SIZE), fill=(20, 14, 10))
    x, y = rng.integers(60, 160, 2)
    draw.ellipse((x, y, x + 110, y + 140), fill=(225, 180, 140))
    draw.rectangle((x - 30, y + 130, x + 140, SIZE), fill=(120, 20, 25))


def ukiyo_e(rng, draw):
    draw.rectangle((0, 0, SIZE, SIZE), fill=(235, 220, 190))
    for band in range(5):
        top = 150 + band * 30 + int(rng.integers(-10, 10))
        points = [(x, top + 25 * np.sin(x / 30 + band)) for x in range(0, SIZE + 10, 10)]
        draw.line(points, fill=(30, 60, 110), width=10)
        draw.line(points, fill=(20, 20, 30), width=2)
    draw.ellipse((220, 30, 280, 90), fill=(200, 40, 40))


STYLES = {
    "Pointillism": pointillism,
    "Minimalism": minimalism,
    "Abstract_Expressionism": abstract_expressionism,
    "Cubism": cubism,
    "Pop_Art": pop_art,
    "Impressionism": impressionism,
    "Baroque": baroque,
    "Ukiyo_e": ukiyo_e,
}


def make_pictures(folder: Path) -> Path:
    rows = []
    for style, draw_style in STYLES.items():
        for i in range(PER_STYLE):
            rng = np.random.default_rng([i, len(rows)])
            image = Image.new("RGB", (SIZE, SIZE))
            draw_style(rng, ImageDraw.Draw(image))
            path = folder / "pictures" / f"{style.lower()}-{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.filter(ImageFilter.SMOOTH).save(path, quality=90)
            rows.append({"uri": f"pictures/{path.name}", "style": style})
    rows.append({"uri": "pictures/missing.jpg", "style": "Baroque"})  # an error row
    pd.DataFrame(rows).to_csv(folder / "catalog.csv", index=False)
    return folder / "catalog.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/artstyle-docs"))
    args = parser.parse_args()
    catalog = make_pictures(args.work)
    output = args.work / "out"
    subprocess.run(
        [sys.executable, "-m", "pipeline", f"--input={catalog}", f"--output={output}",
         "--precision=float32", "--report"],
        check=True,
    )  # fmt: skip
    shot = args.work / "screenshot.png"
    subprocess.run(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}",
         (output / "report.html").as_uri()],
        check=True,
        capture_output=True,
    )  # fmt: skip
    image = Image.open(shot).convert("RGB")
    shown = image.resize(
        (SHOWN_WIDTH, round(image.height * SHOWN_WIDTH / image.width)), Image.LANCZOS
    )
    target = Path(__file__).parent / "report.png"
    shown.save(target, optimize=True)
    print(f"{target}: {shown.width}x{shown.height}")


if __name__ == "__main__":
    main()
