"Every library notebook runs top to bottom and its assertions hold (nbdev's test runner)."
from pathlib import Path

import nbdev.test as nbt
import pytest

NBS = sorted((Path(__file__).resolve().parents[1] / "nbs").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", NBS, ids=[p.stem for p in NBS])
def test_library_notebook_runs(notebook):
    ok, seconds = nbt.test_nb(notebook)
    assert ok, f"{notebook.name} failed (see the traceback above)"
