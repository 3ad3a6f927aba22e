"""Positional arguments are preset files only: a directory or a zip (which runpy would run through its __main__.py)
or any other file is refused in one line before anything runs, and the message points a run directory to
--out_dir=. Driven through the real scripts, as a user would run them."""

import os
import zipfile

import pytest
from test_bad_inputs import assert_user_error, run

PAYLOAD = "open({marker!r}, 'w').write('ran')\n"


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
@pytest.mark.parametrize("kind", ["run directory", "zip", "text file"])
def test_a_positional_argument_that_is_not_a_py_preset_runs_nothing(tmp_path, script, kind):
    marker = tmp_path / "ran"
    payload = PAYLOAD.format(marker=str(marker))
    if kind == "run directory":  # e.g. `python sample.py out-shakespeare-char`
        path = tmp_path / "out-run"
        path.mkdir()
        (path / "__main__.py").write_text(payload)
        fragments = ["is a directory, not a preset file", f"--out_dir={path}"]
    elif kind == "zip":
        path = tmp_path / "preset.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("__main__.py", payload)
        fragments = ["is not a preset file"]
    else:
        path = tmp_path / "preset.txt"
        path.write_text("batch_size = 4\n")
        fragments = ["is not a preset file", ".py"]
    before = sorted(os.listdir(tmp_path))
    assert_user_error(run(script, str(path)), *fragments)
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == before
