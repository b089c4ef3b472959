"""The walk-through notebook executes top to bottom (its cells carry their own assertions)."""

import json

from helpers import PROJECT_ROOT


def test_walkthrough_notebook_runs():
    notebook = json.loads((PROJECT_ROOT / "notebooks" / "walkthrough.ipynb").read_text())
    namespace: dict = {}
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        exec(compile(source, f"walkthrough.ipynb[cell {index}]", "exec"), namespace)
