"""Re-make the README's pictures of the report's first screen and of a `compare` page, from the lesson's two
story runs (docs/story.py makes them), with headless Chromium.

    .venv/bin/python docs/story.py --runs runs             # the two runs, if they are not there yet
    .venv/bin/python docs/screenshots.py --runs runs       # writes docs/images/report-first-screen.png, ...

Needs `chromium` (Debian's package) on PATH.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from deepscope.cli import main as deepscope

IMAGES = Path(__file__).parent / "images"
WINDOW = "1280,900"  # one laptop screen


def screenshot(page: Path, png: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium is not on PATH: install Debian's chromium package")
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={WINDOW}", f"--screenshot={png}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="the folder docs/story.py wrote its two runs into")
    args = parser.parse_args()
    plain, bn = Path(args.runs) / "plain-high-lr", Path(args.runs) / "kaiming-bn"
    for run in (plain, bn):
        if not (run / "config.json").is_file():
            sys.exit(f"{run} is not a run folder: run `python docs/story.py --runs {args.runs}` first")
    IMAGES.mkdir(exist_ok=True)
    if deepscope(["report", str(plain)]) != 0:
        sys.exit("deepscope report failed")
    screenshot(plain / "report.html", IMAGES / "report-first-screen.png")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "compare.html"
        if deepscope(["compare", str(plain), str(bn), "--out", str(page)]) != 0:
            sys.exit("deepscope compare failed")
        screenshot(page, IMAGES / "compare-first-screen.png")


if __name__ == "__main__":
    main()
