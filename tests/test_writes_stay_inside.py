"""Class 1 of "Nothing lost, by construction": writes never leave their directory.

A run directory, a dataset or an export may come from someone else's tarball, which keeps symlinks. For every entry
point and every file it writes, the file is planted beforehand as a symlink to a file outside (the victim); the real
command then either puts its own file in place of the link or refuses in one line, and the victim, like everything
outside the directory, is never changed. Names read from an untrusted file never say where files go."""

import hashlib
import os

import pytest
import torch
from test_bad_inputs import assert_user_error, run
from test_train import args

import train


def snapshot(root) -> dict[str, tuple]:
    """Every file and link under root: (sha256, mtime) of a file, the target of a link."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[os.path.relpath(path, root)] = ("->", os.readlink(path))
            else:
                with open(path, "rb") as f:
                    found[os.path.relpath(path, root)] = (
                        hashlib.sha256(f.read()).hexdigest(),
                        os.stat(path).st_mtime_ns,
                    )
    return found


def plant(directory: str, name: str, outside: str) -> str:
    """directory/name as a symlink to a victim file (or directory, for a checkpoint's name) in `outside`."""
    victim = os.path.join(outside, f"victim-{name.strip('.')}")
    if name.startswith("ckpt-"):
        os.makedirs(victim)
        with open(os.path.join(victim, "model.safetensors"), "w") as f:
            f.write("not yours")
    else:
        with open(victim, "w") as f:
            f.write(f"precious {name}\n")
    os.makedirs(directory, exist_ok=True)
    os.symlink(victim, os.path.join(directory, name))
    return victim


@pytest.fixture
def outside(tmp_path) -> str:
    path = tmp_path / "outside"
    path.mkdir()
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[str, str]:
    """(data_root, out_dir) of a finished 2-iteration run over a character dataset."""
    from conftest import shakespeare_text
    from token_writer import write_dataset

    from engine.tokenization import chars_hash

    root = tmp_path_factory.mktemp("run")
    text = shakespeare_text(20_000)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text]).numpy()
    tok = {"tokenizer": "char", "tokenizer_hash": chars_hash("".join(chars)), "vocab_size": len(chars)}
    write_dataset(
        str(root / "data" / "tiny_char"),
        {"train": ids[:18000], "val": ids[18000:]},
        tok
        | {
            "eot_id": None,
            "chars": "".join(chars),
        },
        source="test",
    )
    out = str(root / "out")
    train.main(args(str(root / "data"), out, "--max_iters=2", "--eval_interval=2"))
    return str(root / "data"), out


# train.py: each file a run writes in out_dir, planted as a link. Written whole-and-renamed files replace the link;
# the two changed in place (the lock, and metrics.jsonl appended to) are refused before anything changes.
TRAIN_FILES = {
    "train_config.py": "replaced",
    "loss_curve.png": "replaced",
    "ckpt-0000002": "replaced",
    ".lock": "refused",
    "metrics.jsonl": "refused",
}


@pytest.mark.slow
@pytest.mark.parametrize("name, outcome", TRAIN_FILES.items(), ids=list(TRAIN_FILES))
def test_train_never_writes_through_a_symlink(char_data, tmp_path, outside, name, outcome):
    out = str(tmp_path / "out")
    victim = plant(out, name, outside)
    before = snapshot(tmp_path)
    result = run("train.py", *args(char_data, out, "--max_iters=2", "--eval_interval=2"))
    if outcome == "refused":
        assert_user_error(result, "symlink", name)
        assert snapshot(tmp_path) == before
    else:
        assert result.returncode == 0, result.stderr
        assert not os.path.islink(os.path.join(out, name))  # the run's own file took the link's place
    assert os.path.exists(victim) and snapshot(outside) == {
        k.removeprefix("outside/"): v for k, v in before.items() if k.startswith("outside/")
    }


@pytest.mark.parametrize("name", ["train.bin", "val.bin", "meta.json"])
def test_prepare_replaces_a_symlinked_dataset_file_and_leaves_its_target(tmp_path, outside, name):
    data = str(tmp_path / "data")
    with open(os.path.join(outside, "input.txt"), "w") as f:
        f.write("to be or not to be, that is the question\n" * 50)
    plant(data, name, outside)
    before = snapshot(outside)
    result = run("prepare/shakespeare_char.py", f"--out={data}", f"--input={os.path.join(outside, 'input.txt')}")
    assert result.returncode == 0, result.stderr
    assert not os.path.islink(os.path.join(data, name)) and os.path.getsize(os.path.join(data, name))
    assert snapshot(outside) == before


@pytest.mark.parametrize(
    "tool, flag, extra",
    [
        ("tools/evaluate.py", "--surprisal", ["--max_tokens=40", "--device=cpu"]),
        ("tools/attention.py", "--png", ["--start=to be"]),
    ],
    ids=["evaluate --surprisal", "attention --png"],
)
def test_an_output_file_that_is_a_symlink_is_replaced_not_written_through(
    finished_run, tmp_path, outside, tool, flag, extra
):
    data_root, out = finished_run
    target = os.path.join(tmp_path, "result.out")
    os.symlink(_victim(outside), target)
    before = snapshot(outside)
    tokens = [f"--tokens={os.path.join(data_root, 'tiny_char', 'val.bin')}"] if "evaluate" in tool else []
    result = run(tool, f"--out_dir={out}", *tokens, f"{flag}={target}", *extra)
    assert result.returncode == 0, result.stderr
    assert not os.path.islink(target) and os.path.getsize(target)
    assert snapshot(outside) == before


def _victim(outside: str) -> str:
    path = os.path.join(outside, "victim-output")
    with open(path, "w") as f:
        f.write("precious output\n")
    return path


def test_an_output_named_as_a_run_or_dataset_file_is_refused(finished_run, tmp_path):
    data_root, out = finished_run
    before = snapshot(os.path.dirname(out))
    for target in (os.path.join(out, "metrics.jsonl"), os.path.join(data_root, "tiny_char", "train.bin")):
        result = run(
            "tools/evaluate.py",
            f"--out_dir={out}",
            f"--tokens={os.path.join(data_root, 'tiny_char', 'val.bin')}",
            f"--surprisal={target}",
            "--max_tokens=40",
        )
        assert_user_error(result, "not an output")
    assert snapshot(os.path.dirname(out)) == before


def test_export_overwrite_replaces_an_earlier_export_only(finished_run, tmp_path, outside):
    _, out = finished_run
    hf_dir = str(tmp_path / "hf")
    assert run("tools/export_hf.py", f"--out_dir={out}", f"--hf_dir={hf_dir}").returncode == 0
    victims = {name: _planted_over(hf_dir, name, outside) for name in ("config.json", "tokenizer.json")}
    before = snapshot(outside)
    result = run("tools/export_hf.py", f"--out_dir={out}", f"--hf_dir={hf_dir}", "--overwrite=True")
    assert result.returncode == 0, result.stderr
    assert not any(os.path.islink(os.path.join(hf_dir, name)) for name in victims)
    assert snapshot(outside) == before
    # a directory holding anything an export does not write (a dataset's files beside a tokenizer.json) is not one
    dataset = str(tmp_path / "bpe_dataset")
    os.makedirs(dataset)
    for name in ("tokenizer.json", "meta.json", "train.bin"):
        with open(os.path.join(dataset, name), "w") as f:
            f.write(name)
    before = snapshot(tmp_path)
    assert_user_error(
        run("tools/export_hf.py", f"--out_dir={out}", f"--hf_dir={dataset}", "--overwrite=True"), "does not write"
    )
    assert snapshot(tmp_path) == before


def _planted_over(directory: str, name: str, outside: str) -> str:
    os.remove(os.path.join(directory, name))
    return plant(directory, name, outside)


@pytest.mark.parametrize("where", ["absolute", "a/b", ".."])
def test_a_nanogpt_checkpoint_never_names_where_its_dataset_is_written(tmp_path, outside, where):
    """prepare/from_nanogpt.py writes the dataset's meta.json in data/<the checkpoint's dataset>: a name that is an
    absolute path (here, to a nanoGPT dataset outside, where meta.json would land) or has more than one component is
    refused in one line, before anything is written."""
    from test_from_nanogpt import nano_checkpoint

    theirs = os.path.join(outside, "nano_data")
    os.makedirs(theirs)
    for split in ("train", "val"):
        torch.randint(65, (2000,), dtype=torch.int32).numpy().astype("uint16").tofile(
            os.path.join(theirs, f"{split}.bin")
        )
    dataset = theirs if where == "absolute" else where
    nano_checkpoint(str(tmp_path / "ckpt.pt"), 65, dataset)
    before = snapshot(tmp_path)
    result = run("prepare/from_nanogpt.py", str(tmp_path / "ckpt.pt"), f"--out_dir={tmp_path / 'ours'}")
    assert_user_error(result, repr(dataset))
    assert snapshot(tmp_path) == before
