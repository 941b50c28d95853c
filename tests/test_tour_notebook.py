"""examples/tour.ipynb, executed with nbclient in a fresh kernel on a tiny dataset: it runs without an
error, its figures arrive as images, each once, and no cell shows a figure as the text "<Figure ...>"."""
import os
from pathlib import Path

import pytest

from conftest import write_tiny_dataset

nbclient = pytest.importorskip("nbclient", reason="the notebook extra is not installed (pip install deepscope[notebook])")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

TOUR = Path(__file__).resolve().parents[1] / "examples" / "tour.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    data = write_tiny_dataset(tmp_path_factory.mktemp("tour-data"), n_train=512, n_test=128)
    work = tmp_path_factory.mktemp("tour-run")
    nb = nbformat.read(TOUR, as_version=4)
    env = {"DEEPSCOPE_TOUR_DATA": str(data), "OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                resources={"metadata": {"path": str(work)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def outputs(nb):
    return [(i, o) for i, cell in enumerate(nb.cells) if cell.cell_type == "code" for o in cell.get("outputs", [])]


def test_the_tour_runs_without_an_error(executed):
    assert not [o for _, o in outputs(executed) if o.output_type == "error"]


def test_figures_are_images_and_never_the_text_figure(executed):
    # a figure shown only as its text (what a fresh kernel does with a bare matplotlib Figure)
    texts = [str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", "")) for _, o in outputs(executed)
             if "image/png" not in o.get("data", {})]
    assert not [t for t in texts if "Figure size" in t]
    warnings = [str(o.get("text", "")) for _, o in outputs(executed) if o.output_type == "stream" and o.name == "stderr"]
    assert not [w for w in warnings if "Warning" in w], warnings  # e.g. tqdm's "IProgress not found"
    images = [i for i, o in outputs(executed) if "image/png" in o.get("data", {})
              or "data:image/png" in str(o.get("data", {}).get("text/html", ""))]
    cells = {i for i in images}
    # the live plot, mean/std, colourful dimension, the LR finder and the update ratios: each shows an image...
    assert len(cells) >= 5, images
    # ...and each plot function's cell shows exactly one
    for i, cell in enumerate(executed.cells):
        if cell.cell_type == "code" and cell.source.startswith("plots."):
            assert images.count(i) == 1, (cell.source, images.count(i))


def test_rich_outputs_for_stats_and_diagnosis(executed):
    html = "\n".join(str(o.get("data", {}).get("text/html", "")) for _, o in outputs(executed))
    assert "off fraction" in html            # Stats as a table
    assert "checks on" in html               # the analysis says what it checked
    loop = [o for i, o in outputs(executed) if "show_training_loop" in executed.cells[i].source]
    assert loop and all("\\n" not in str(o.get("data", {}).get("text/plain", "")) for o in loop)
