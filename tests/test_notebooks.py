"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient), so notebooks cannot rot.

The quickstart notebook needs a run dir: it gets a random-weight tiny stage-1 model with a LoRA adapter per
sub-task, saved the way training saves them (no training: the notebook's code paths, not its music, are tested).
"""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
QUICKSTART = "quickstart.ipynb"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, make_random_run):
    from musicray.tokens import SUBTASKS

    run = tmp_path_factory.mktemp("run")
    make_random_run(run, SUBTASKS, run / "cache")
    return run


def execute(path: Path, **environment: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    # One intra-op thread, as in this process (conftest.py): the tiny model only contends for shared cores.
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1", **environment})
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in outputs(notebook) if output["output_type"] == "stream")


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert not outputs(notebook), f"{path.name}: clear the outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, request):
    run = request.getfixturevalue("tiny_run") if path.name == QUICKSTART else None
    notebook = execute(path, **({"MUSICRAY_RUN": str(run)} if run else {}))
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells), "a code cell did not run"
    assert printed(notebook)
    if run:
        check_quickstart(notebook, run)


def check_quickstart(notebook: nbformat.NotebookNode, run: Path) -> None:
    images = [output for output in outputs(notebook) if "image/png" in output.get("data", {})]
    assert len(images) >= 2, "the piano roll and the performance curves are shown inline"
    assert (run / "quickstart" / "piano_roll.png").is_file() and (run / "quickstart" / "performance.png").is_file()
    from musicray.midi import read_midi

    song = read_midi(run / "quickstart" / "song.mid")
    assert song.form == "i2A4B4A4o2" and all(song.tracks.values())
    text = printed(notebook)
    assert "loaded adapters: ['chord', 'melody', 'secondary', 'dynamics', 'tempo']" in text
    players = [output for output in outputs(notebook) if "<audio" in output.get("data", {}).get("text/html", "")]
    if audio_preview_available():
        assert len(players) == 1 and (run / "quickstart" / "song.wav").is_file()
    else:
        assert not players and "pip install midirenderer" in text


def audio_preview_available() -> bool:
    from musicray.render import RendererUnavailable, choose_renderer, find_soundfont

    try:
        choose_renderer(), find_soundfont()
    except RendererUnavailable:
        return False
    return True


def test_quickstart_says_how_to_make_a_missing_run(tmp_path):
    with pytest.raises(CellExecutionError, match="run `musicray pipeline --preset tiny --out runs/tiny` first"):
        execute(NOTEBOOK_DIR / QUICKSTART, MUSICRAY_RUN=str(tmp_path / "no-run"))
