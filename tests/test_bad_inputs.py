"""Every user mistake ends in one line `error: ...` on stderr, exit code 2, no traceback, and no file changed.

The table (CASES) runs an entry script's main() through errors.run_cli, exactly as `python train.py ...` does. The
cases after it run the real scripts as subprocesses from the repository root, as a user would."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import shakespeare_char
import text
import torch

import sample
import train
from engine.checkpoint import save_checkpoint
from engine.errors import run_cli
from model import GPT, GPTConfig
from tools import attention, evaluate, export_hf

TINY = [
    "--device=cpu",
    "--compile=False",
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--block_size=8",
    "--batch_size=2",
    "--gradient_accumulation_steps=1",
    "--eval_iters=1",
    "--max_iters=2",
    "--eval_interval=2",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared dataset, a trained run, broken copies of both, a char checkpoint and an MoE checkpoint."""
    from conftest import shakespeare_text

    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    good = data / "good"
    good.mkdir(parents=True)
    (good / "input.txt").write_text(shakespeare_text(20_000), encoding="utf-8")
    shakespeare_char.main([f"--out={good}"])
    for name, damage in {
        "truncated": lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-10]),
        "odd": lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes() + b"\0"),
        "badjson": lambda d: (d / "meta.json").write_text("{not json"),
        "emptyval": lambda d: _set_split(d, "val", 0),
        "badids": lambda d: _poke(d, b"\xff\xff", rehash=True),
        "changed": lambda d: _poke(d, b"\x01\x00", rehash=False),
    }.items():
        broken = data / name
        broken.mkdir()
        for f in good.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        damage(broken)
    run = root / "run"
    train.main([f"--data_root={data}", "--dataset=good", f"--out_dir={run}", *TINY])
    corrupt = root / "corrupt"
    corrupt.mkdir()
    ckpt = sorted(run.iterdir())[0]
    (corrupt / ckpt.name).mkdir()
    for f in ckpt.iterdir():
        (corrupt / ckpt.name / f.name).write_bytes(f.read_bytes())
    weights = corrupt / ckpt.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    moe = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=16, n_expert=2, n_expert_active=1))
    save_checkpoint(
        str(root / "moe"),
        1,
        moe,
        {},
        {"model_config": moe.config.__dict__, "train_config": {}, "data": {"tokenizer": "char", "chars": "abcdefghij"}},
    )
    for name, edit in {
        "bigmeta": lambda d: _edit_meta(d, n_layer=10**12, n_embd=2**20, n_head=2),
        "newer": lambda d: _edit_meta(d, attention_sinks=4),
        "badtypes": lambda d: _edit_meta(d, n_layer="many"),
        "nostate": lambda d: torch.save({"weights": 1}, d / "state.pt"),
        "extratensor": lambda d: _add_tensor(d, "extra.weight", torch.zeros(3)),
    }.items():
        target = root / name / ckpt.name
        target.mkdir(parents=True)
        for f in ckpt.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        edit(target)
        _rehash(target)
    hf = root / "hfbig"
    hf.mkdir()
    big = {"model_type": "gpt2", "n_layer": 10**12, "n_embd": 4096, "n_head": 32, "n_positions": 1024}
    big["vocab_size"] = 50257
    (hf / "config.json").write_text(json.dumps(big))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(hf / "model.safetensors"))
    (root / "mamba").mkdir()
    (root / "mamba" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (root / "ok.txt").write_text("the king and queen")
    (root / "empty.jsonl").write_text("")
    (root / "nocol.jsonl").write_text('{"body": "hello"}\n')
    (root / "null.jsonl").write_text('{"text": "hello"}\n{"text": null}\n')
    (root / "number.jsonl").write_text('{"text": "hello"}\n{"text": 5}\n')
    (root / "invalid.jsonl").write_text('{"text": "hello"}\n{"text": hello}\n')
    (root / "blank.csv").write_text('text\n""\n""\n')
    (root / "syntax.py").write_text("batch_size = = 3\n")
    (root / "unknown.py").write_text("batch_sise = 3\n")
    return root


def _edit_meta(d, **model_config):
    meta = json.loads((d / "meta.json").read_text())
    meta["model_config"] |= model_config
    (d / "meta.json").write_text(json.dumps(meta))


def _add_tensor(d, name, tensor):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(d / "model.safetensors")) | {name: tensor}
    save_file(weights, str(d / "model.safetensors"))


def _rehash(d):  # the checksums match: the damage is in the content, not in transit
    from engine.checkpoint import _FILES, _sha256

    (d / "COMPLETE").write_text(json.dumps({name: _sha256(str(d / name)) for name in _FILES}))


def _poke(d, two_bytes, rehash):  # overwrite the 11th token of train.bin
    import hashlib

    data = bytearray((d / "train.bin").read_bytes())
    data[20:22] = two_bytes
    (d / "train.bin").write_bytes(bytes(data))
    if rehash:  # damage that happened before prepare hashed the file: only the id check can see it
        meta = json.loads((d / "meta.json").read_text())
        meta["splits"]["train"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        (d / "meta.json").write_text(json.dumps(meta))


def _set_split(d, split, tokens):
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"][split]["tokens"] = tokens
    (d / f"{split}.bin").write_bytes(b"")
    (d / "meta.json").write_text(json.dumps(meta))


def T(*extra, dataset="good"):  # a train.py command line in `world`
    return ("train", ["--data_root={root}/data", f"--dataset={dataset}", "--out_dir={root}/fresh", *TINY, *extra])


def P(source):  # a prepare/text.py command line that would re-prepare the good dataset
    return ("prepare_text", [f"--input={source}", "--out={root}/data/good", "--tokenizer=char"])


def V(*extra):  # a tools/evaluate.py command line
    return ("evaluate", ["--out_dir={root}/run", "--device=cpu", *extra])


def E(hf_dir, *extra):  # a tools/export_hf.py command line
    return ("export_hf", ["--out_dir={root}/run", f"--hf_dir={hf_dir}", *extra])


def S(*extra, out="run"):  # a sample.py command line
    return ("sample", [f"--out_dir={{root}}/{out}", "--device=cpu", "--max_new_tokens=2", *extra])


CASES = {
    "unknown key": (T("--batch_sise=3"), "did you mean --batch_size"),
    "bad int": (T("--max_iters=abc"), "max_iters"),
    "bad bool": (T("--compile=maybe"), "compile"),
    "flag without value": (T("--learning_rate"), "no value"),
    "missing preset": (T("{root}/nope.py"), "not found"),
    "preset syntax error": (T("{root}/syntax.py"), "syntax.py"),
    "preset unknown key": (T("{root}/unknown.py"), "batch_sise"),
    "unknown dtype": (T("--dtype=float64"), "dtype"),
    "float16 on cpu": (T("--dtype=float16"), "float16"),
    "unknown device": (T("--device=tpu"), "device"),
    "missing dataset": (T(dataset="nope"), "prepare/text.py --input=<your files> --out="),
    "empty dataset name": (T(dataset=""), "dataset is empty"),
    "token id outside the vocabulary": (T(dataset="badids"), "holds token id 65535 at position 10, outside"),
    "token file changed since prepare": (T(dataset="changed"), "does not match the sha256"),
    "truncated tokens": (T(dataset="truncated"), "re-run the prepare script"),
    "odd-sized tokens": (T(dataset="odd"), "re-run the prepare script"),
    "corrupt meta.json": (T(dataset="badjson"), "invalid"),
    "empty val split": (T(dataset="emptyval"), "val split"),
    "block_size too big for the data": (T("--block_size=100000"), "block_size"),
    "heads do not divide": (T("--n_head=3"), "divisible"),
    "unknown position scheme": (T("--pos_embedding=foo"), "pos_embedding"),
    "kv heads do not divide": (T("--n_kv_head=3", "--n_head=4"), "n_kv_head"),
    "accumulation zero": (T("--gradient_accumulation_steps=0"), "gradient_accumulation_steps"),
    "unknown optimizer": (T("--optimizer=sgd"), "optimizer"),
    "unknown schedule": (T("--lr_schedule=linear"), "lr_schedule"),
    "fsdp without torchrun": (T("--zero_stage=2", "--optimizer=muon"), "shards over the processes of a torchrun job"),
    "fp8 without the hardware": (T("--fp8=True"), "fp8"),
    "negative grad_clip (gradient ascent)": (T("--grad_clip=-1"), "grad_clip must be a number >= 0"),
    "negative learning rate": (T("--learning_rate=-1e-3"), "learning_rate must be"),
    "nan learning rate": (T("--learning_rate=nan"), "not a finite number"),
    "infinite min_lr": (T("--min_lr=inf"), "not a finite number"),
    "beta2 of 1": (T("--beta2=1"), "beta2 must be in [0, 1)"),
    "negative beta1": (T("--beta1=-0.1"), "beta1 must be in [0, 1)"),
    "nan weight_decay": (T("--weight_decay=nan"), "not a finite number"),
    "zero norm_eps": (T("--norm_eps=0"), "norm_eps must be a positive number"),
    "negative seed": (T("--seed=-1"), "seed must be in [0, 2**63)"),
    "huge seed": (T("--seed=1e30"), "seed must be in [0, 2**63)"),
    "negative muon learning rate": (T("--optimizer=muon", "--muon_learning_rate=-1"), "muon_learning_rate"),
    "out_dir is a file": (T("--out_dir={root}/empty.txt"), "cannot write to out_dir"),
    "out_dir under a file": (T("--out_dir={root}/empty.txt/out"), "cannot write to out_dir"),
    "empty out_dir": (T("--out_dir="), "out_dir"),
    "absurd n_layer": (T("--n_layer=1e12"), "needs at least"),
    "absurd vocab_size": (T("--vocab_size=1e10"), "needs at least"),
    "absurd n_embd": (T("--n_embd=1048576"), "needs at least"),
    "absurd batch_size": (T("--batch_size=1e9"), "or batch_size"),
    "init_from typo": (T("--init_from=resum"), "did you mean resume?"),
    "init_from empty": (T("--init_from="), "--init_from is empty"),
    "init_from a directory without config.json": (T("--init_from={root}/data"), "has no config.json"),
    "init_from a missing directory, offline": (T("--init_from={root}/nothing/here"), "no local directory"),
    "init_from an unsupported model type": (T("--init_from={root}/mamba"), "model_type 'mamba' is not supported"),
    "init_from a config.json with absurd sizes": (T("--init_from={root}/hfbig"), "needs at least"),
    "sample a checkpoint with absurd sizes": (S(out="bigmeta"), "needs at least"),
    "sample a newer version's checkpoint": (S(out="newer"), "newer version of this code (model_config has attention"),
    "sample a checkpoint with wrong types": (S(out="badtypes"), "meta.json: model_config: n_layer: input should be"),
    "sample weights with an extra tensor": (S(out="extratensor"), "unexpected tensors extra.weight"),
    "resume a state.pt that is not ours": (
        T("--out_dir={root}/nostate", "--init_from=resume"),
        "not a training state of this code",
    ),
    "resume without checkpoint": (T("--init_from=resume"), "no checkpoint"),
    "resume a different model": (
        (
            "train",
            [
                "--data_root={root}/data",
                "--dataset=good",
                "--out_dir={root}/run",
                *TINY,
                "--n_layer=2",
                "--init_from=resume",
            ],
        ),
        "n_layer (1 -> 2)",
    ),
    "scratch over checkpoints": (
        ("train", ["--data_root={root}/data", "--dataset=good", "--out_dir={root}/run", *TINY]),
        "--init_from=resume",
    ),
    "only a corrupt checkpoint": (S(out="corrupt"), "corrupt"),
    "sample without checkpoint": (S(out="nothing"), "no checkpoint"),
    "top_p above 1": (S("--top_p=1.5"), "top_p"),
    "negative temperature": (S("--temperature=-1"), "temperature"),
    "nan temperature": (S("--temperature=nan"), "not a finite number"),
    "nan repetition_penalty": (S("--repetition_penalty=nan"), "not a finite number"),
    "bad escape in stop": (S("--stop=\\x"), "bad escape"),
    "negative sample seed": (S("--seed=-5"), "seed must be in"),
    "top_k zero": (S("--top_k=0"), "top_k"),
    "min_p above 1": (S("--min_p=2"), "min_p"),
    "no samples": (S("--num_samples=0"), "num_samples"),
    "negative max_new_tokens": (S("--max_new_tokens=-1"), "max_new_tokens"),
    "missing prompt file": (S("--start=FILE:/nonexistent/prompt.txt"), "not found"),
    "character outside the vocabulary": (S("--start=☃"), "not in this dataset's vocabulary"),
    "stream several samples": (S("--stream=True", "--num_samples=2"), "num_samples=1"),
    "prompt file not UTF-8": (S("--start=FILE:{root}/latin1.txt"), "is not UTF-8 text"),
    "evaluate text not UTF-8": (V("--text={root}/latin1.txt"), "is not UTF-8 text"),
    "surprisal into a missing directory": (V("--text={root}/ok.txt", "--surprisal={root}/nope/s.jsonl"), "not exist"),
    "surprisal over its own input": (V("--text={root}/ok.txt", "--surprisal={root}/ok.txt"), "also an input"),
    "surprisal onto a directory": (V("--text={root}/ok.txt", "--surprisal={root}/data"), "is a directory"),
    "attention png into a missing directory": (
        ("attention", ["--out_dir={root}/run", "--start=the", "--png={root}/nope/a.png"]),
        "does not exist",
    ),
    "export MoE": (("export_hf", ["--out_dir={root}/moe", "--hf_dir={root}/hf"]), "Mixture of Experts"),
    "export into the checkpoint itself": (E("{root}/run/ckpt-0000002"), "holds a checkpoint or a training run"),
    "export into a training run": (E("{root}/run"), "holds a checkpoint or a training run"),
    "export into a checkpoint, overwrite or not": (E("{root}/run", "--overwrite=True"), "holds a checkpoint"),
    "export into a non-empty directory": (E("{root}/data"), "not empty"),
    "export onto a file": (E("{root}/empty.txt"), "is a file"),
    "export under a file": (E("{root}/empty.txt/hf"), "cannot write"),
    # re-preparing a dataset from a bad input leaves the old one (and a char dataset's vocabulary) as it was
    "re-prepare chars from an empty input": (
        ("prepare_char", ["--out={root}/data/good", "--input={root}/empty.txt"]),
        "empty.txt is empty",
    ),
    "re-prepare text from an empty input": (P("{root}/empty.txt"), "empty.txt is empty"),
    "prepare an empty JSONL": (P("{root}/empty.jsonl"), "empty.jsonl is empty"),
    "prepare JSONL without the column": (P("{root}/nocol.jsonl"), "no column 'text'"),
    "prepare JSONL with a null text": (P("{root}/null.jsonl"), "row 2 of the input"),
    "prepare JSONL with a numeric text": (P("{root}/number.jsonl"), "row 2 of the input"),
    "prepare invalid JSONL": (P("{root}/invalid.jsonl"), "invalid.jsonl:2: not valid JSON"),
    "prepare text with only empty rows": (P("{root}/blank.csv"), "holds no text"),
}


PROGRESS = re.compile(r"\d+ examples \[|[\d.?]+ ?(?:examples|tok|it)/s\]")


def snapshot(root) -> dict:
    return {p: (os.path.getsize(p), os.path.getmtime(p)) for p in map(str, root.rglob("*")) if os.path.isfile(p)}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_exit_2_and_changes_nothing(world, name, capsys):
    (script, argv), fragment = CASES[name]
    if name == "fp8 without the hardware" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [a.replace("{root}", str(world)) for a in argv]
    main = {
        "train": train.main,
        "sample": sample.main,
        "export_hf": export_hf.main,
        "evaluate": evaluate.main,
        "attention": attention.main,
        "prepare_char": shakespeare_char.main,
        "prepare_text": text.main,
    }[script]
    before = snapshot(world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    # progress bars (prepare shows them on stderr) are not messages
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and fragment in lines[0], lines[0]
    assert snapshot(world) == before  # no file written, changed or removed


# --- the real scripts, as subprocesses --------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *argv: str) -> subprocess.CompletedProcess:
    env = os.environ.copy()  # keeps TIKTOKEN_CACHE_DIR
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, script, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def abc_checkpoint(tmp_path_factory) -> str:
    """An out_dir holding one checkpoint of a tiny model over the character vocabulary "abc"."""
    out = tmp_path_factory.mktemp("abc")
    model = GPT(GPTConfig(block_size=8, vocab_size=3, n_layer=1, n_head=1, n_embd=8))
    data = {"tokenizer": "char", "vocab_size": 3, "dtype": "uint16", "eot_id": None, "chars": "abc"}
    meta = {"model_config": dataclasses.asdict(model.config), "train_config": {}, "data": data, "val_loss": 1.0}
    state = {"optimizer": {}, "scaler": {}, "iter_num": 1, "best_val_loss": 1.0}
    save_checkpoint(str(out), 1, model, state, meta)
    return str(out)


TRAIN_CASES = {
    "unknown_key": (["--batch_sise=3"], ["'batch_sise'", "--batch_size"]),
    "bad_int": (["--max_iters=abc"], ["max_iters", "int"]),
    "bad_bool": (["--compile=maybe"], ["compile", "bool"]),
    "no_value": (["--compile"], ["--compile=VALUE"]),
    "missing_preset": (["config/no_such_preset.py"], ["no_such_preset.py", "not found"]),
    "invalid_value": (["--gradient_accumulation_steps=0"], ["gradient_accumulation_steps must be >= 1"]),
    "float16_on_cpu": (["--device=cpu", "--dtype=float16"], ["float16", "CPU"]),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_config_errors(case):
    argv, fragments = TRAIN_CASES[case]
    assert_user_error(run("train.py", *argv), *fragments)


def test_train_missing_dataset_says_to_prepare(tmp_path):
    result = run("train.py", "--device=cpu", f"--data_root={tmp_path}", "--dataset=nope")
    assert_user_error(result, "prepare/text.py --input=<your files>")  # there is no prepare/nope.py to name
    result = run("train.py", "--device=cpu", f"--data_root={tmp_path}", "--dataset=shakespeare_char")
    assert_user_error(result, "python prepare/shakespeare_char.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_train_cuda_without_cuda():
    assert_user_error(run("train.py", "--device=cuda"), "CUDA is not available")


def test_train_resume_without_checkpoint(char_data, tmp_path):
    out = tmp_path / "empty"
    result = run(
        "train.py",
        "--device=cpu",
        f"--data_root={char_data}",
        "--dataset=tiny_char",
        f"--out_dir={out}",
        "--block_size=16",
        "--init_from=resume",
    )
    assert_user_error(result, "no checkpoint in")


def test_train_vocab_smaller_than_the_dataset(char_data, tmp_path):
    data = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={tmp_path / 'out'}"]
    result = run("train.py", "--device=cpu", *data, "--block_size=16", "--n_layer=1", "--vocab_size=10")
    assert_user_error(result, "vocab_size 10 is smaller than the dataset's")


def test_sample_without_checkpoint(tmp_path):
    assert_user_error(run("sample.py", "--device=cpu", f"--out_dir={tmp_path}"), "no checkpoint in")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--top_p=1.5"], ["top_p"]),
        (["--temperature=-1"], ["temperature"]),
        (["--top_k=0"], ["top_k"]),
        (["--start=FILE:/nonexistent/prompt.txt"], ["/nonexistent/prompt.txt", "not found"]),
        (["--start=abxyz"], ["'xyz'", "vocabulary"]),
        (["--start="], ["prompt is empty"]),
        (["--checkpoint=newest"], ["'newest'", "latest or best"]),
        (
            ["--num_samples=1000000000", "--start=ab"],
            ["sampling 1,000,000,000 sequences at once needs", "lower --num_samples"],
        ),
    ],
    ids=[
        "top_p",
        "temperature",
        "top_k",
        "prompt_file",
        "char_outside_vocab",
        "empty_prompt",
        "checkpoint_choice",
        "num_samples_too_many",
    ],
)
def test_sample_errors(abc_checkpoint, argv, fragments):
    assert_user_error(run("sample.py", "--device=cpu", f"--out_dir={abc_checkpoint}", *argv), *fragments)


def test_sample_with_only_corrupt_checkpoints(abc_checkpoint, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(abc_checkpoint, out)
    weights = out / "ckpt-0000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # truncated
    result = run("sample.py", "--device=cpu", f"--out_dir={out}")
    assert_user_error(result, "corrupt")
    assert "warning: skipping corrupt checkpoint" in result.stdout


def test_sample_with_a_valid_prompt_works(abc_checkpoint, tmp_path):
    """The control for the cases above: the same checkpoint samples fine from a prompt inside its vocabulary."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("cab")
    result = run(
        "sample.py",
        "--device=cpu",
        f"--out_dir={abc_checkpoint}",
        f"--start=FILE:{prompt}",
        "--num_samples=2",
        "--max_new_tokens=5",
    )
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")[:2]
    assert len(samples) == 2 and all(s.startswith("cab") and set(s.strip()) <= set("abc") for s in samples)
