"""The GPU chapter's executor (.ci/execute_notebook.py): outputs as nbconvert records them."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "execute_notebook.py"


@pytest.fixture(scope="module")
def executor():
    spec = importlib.util.spec_from_file_location("execute_notebook", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notebook(*sources, tags=None):
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# title\n"]}]
    for k, s in enumerate(sources):
        cells.append({"cell_type": "code", "metadata": {"tags": (tags or {}).get(k, [])}, "execution_count": None,
                      "outputs": [], "source": s.splitlines(keepends=True)})
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_streams_values_figures_and_one_namespace(executor, tmp_path):
    nb = _notebook("x = 6\nprint('x is', x)", "import sys\nprint('warn', file=sys.stderr)\nx * 7",
                   "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nplt.plot([0, 1])",
                   "y = x + 1", tags={3: ["skip-execution"]})
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert executor.main([str(path)]) == 0
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in cells] == [1, 2, 3, None]
    assert cells[0]["outputs"] == [{"output_type": "stream", "name": "stdout", "text": ["x is 6\n"]}]
    kinds = [(o["output_type"], o.get("name")) for o in cells[1]["outputs"]]
    assert kinds == [("stream", "stderr"), ("execute_result", None)]
    assert cells[1]["outputs"][1]["data"]["text/plain"] == ["42"]
    figure = [o for o in cells[2]["outputs"] if o["output_type"] == "display_data"]
    assert len(figure) == 1 and base64.b64decode(figure[0]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert cells[3]["outputs"] == []


def test_a_failing_cell_is_recorded_and_stops_the_rest(executor, tmp_path):
    nb = _notebook("print('before')", "1 / 0", "print('never')")
    path, out = tmp_path / "nb.ipynb", tmp_path / "out.ipynb"
    path.write_text(json.dumps(nb))
    assert executor.main([str(path), "--out", str(out)]) == 1
    assert json.loads(path.read_text()) == nb  # --out: the source is left alone
    cells = [c for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code"]
    error = cells[1]["outputs"][-1]
    assert error["output_type"] == "error" and error["ename"] == "ZeroDivisionError"
    assert cells[2]["outputs"] == [] and cells[2]["execution_count"] is None
