"""Execute a notebook's code cells in one Python namespace and write their outputs into it.

    python3 .ci/execute_notebook.py NOTEBOOK [--out PATH] [--cwd DIR]

For the GPU machine, which has no Jupyter: only the standard library. Each code cell runs with
``exec`` in turn; what it prints becomes a ``stream`` output, an exception an ``error`` output (and
the cells after it are left without outputs, as nbconvert stops), the value of a final expression
an ``execute_result`` (its ``repr``), and every open matplotlib figure an ``image/png``
``display_data``. Cells tagged ``skip-execution`` are left as they are. The notebook is written to
``--out`` (default: in place) with nbformat 4 outputs and execution counts, so Jupyter Book shows it
as nbconvert would have written it. Exit status 1 when a cell raised.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path


def _stream(name: str, text: str) -> dict:
    return {"output_type": "stream", "name": name, "text": text.splitlines(keepends=True)}


def _figures() -> list[dict]:
    """The open matplotlib figures as PNG display_data outputs (then closed); none without matplotlib."""
    if "matplotlib.pyplot" not in sys.modules:
        return []
    import matplotlib.pyplot as plt

    outputs = []
    for number in plt.get_fignums():
        buffer = io.BytesIO()
        plt.figure(number).savefig(buffer, format="png", bbox_inches="tight")
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                                 "text/plain": [f"<Figure {number}>"]}})
    plt.close("all")
    return outputs


def run_cell(source: str, namespace: dict, count: int) -> tuple[list[dict], bool]:
    """(outputs, ok) of one cell: statements run in order, a final expression's value shown."""
    out, err = io.StringIO(), io.StringIO()
    outputs: list[dict] = []
    ok = True
    try:
        tree = ast.parse(source, filename=f"<cell {count}>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(compile(tree, f"<cell {count}>", "exec"), namespace)
            value = None
            if last is not None:
                value = eval(compile(ast.Expression(last.value), f"<cell {count}>", "eval"), namespace)
        if value is not None:
            outputs.append({"output_type": "execute_result", "execution_count": count, "metadata": {},
                            "data": {"text/plain": repr(value).splitlines(keepends=True)}})
    except BaseException as e:  # noqa: BLE001 - a cell's failure is recorded, as nbconvert does
        ok = False
        outputs.append({"output_type": "error", "ename": type(e).__name__, "evalue": str(e),
                        "traceback": traceback.format_exception(e)})
    streams = [_stream(name, text) for name, text in (("stdout", out.getvalue()), ("stderr", err.getvalue()))
               if text]
    return streams + _figures() + outputs, ok


def execute(notebook: dict, cwd: Path | None = None) -> bool:
    """Run the code cells of ``notebook`` (a parsed nbformat 4 dict) in place; False if a cell raised."""
    namespace: dict = {"__name__": "__main__"}
    count = 0
    failed = False
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        for cell in notebook["cells"]:
            if cell["cell_type"] != "code":
                continue
            if failed or "skip-execution" in cell.get("metadata", {}).get("tags", []):
                cell["outputs"], cell["execution_count"] = [], None
                continue
            count += 1
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            cell["outputs"], ok = run_cell(source, namespace, count)
            cell["execution_count"] = count
            failed = not ok
    finally:
        os.chdir(previous)
    return not failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write it (default: in place)")
    parser.add_argument("--cwd", type=Path, default=None, help="the cells' working directory (default: here)")
    args = parser.parse_args(argv)
    notebook = json.loads(args.notebook.read_text())
    ok = execute(notebook, args.cwd)
    out = args.out or args.notebook
    out.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    print(f"{'executed' if ok else 'FAILED (a cell raised; its traceback is in the notebook)'}: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
