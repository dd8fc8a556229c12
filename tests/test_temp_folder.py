"""The suite writes its temporary files into one folder of its own (tests/conftest.py), removed after a passing run."""
import os
import tempfile
from pathlib import Path


def test_temporary_files_go_into_the_runs_own_folder(tmp_path):
    root = Path(tempfile.gettempdir())
    assert root.name.startswith("cma-clip-tests-")
    assert os.environ["TMPDIR"] == str(root)  # subprocesses: torchrun, chromium, Ray's workers
    # Gradio's uploads and cache (a running app's own folder of the run while it serves: app.keep_uploads_in)
    assert root in Path(os.environ["GRADIO_TEMP_DIR"]).resolve().parents
    assert root in tmp_path.resolve().parents  # pytest's own folders
    with tempfile.NamedTemporaryFile() as handle:
        assert Path(handle.name).parent == root


def test_gradio_took_the_folder(tmp_path):
    from gradio import route_utils

    assert Path(route_utils.DEFAULT_TEMP_DIR).parent == Path(tempfile.gettempdir())
