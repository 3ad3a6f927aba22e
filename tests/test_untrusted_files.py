"""Every file we read but may not have written goes through engine/schemas.py before use: a hostile one is one line
naming the file, never a traceback, a Rust panic, or a write.

The fuzz runs the readers of tests/hostile_files.py on a few hundred generated hostile variants each, seeded so every
run tries the same files (bench/fuzz_readers.py runs more). The cases after it pin what the fuzz found, and run the
real entry scripts as subprocesses: exit code 2, one `error:` line naming the file, nothing changed."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import rehash_checkpoint
from hostile_files import READERS, attempt, build_world, load_base, snapshot, variants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, str]:
    return build_world(str(tmp_path_factory.mktemp("untrusted")))


@pytest.mark.parametrize("reader", READERS, ids=[r.name for r in READERS])
def test_the_valid_files_load(worlds, reader, tmp_path, monkeypatch):
    """The control: each reader takes the world's own file and puts it to use, so the fuzz below tests refusals of
    files that differ from a good one, not of a broken world."""
    scratch = shutil.copytree(worlds[reader.template], tmp_path / "world")
    monkeypatch.chdir(scratch)
    reader.use(reader.read(str(scratch)))


@pytest.mark.parametrize("reader", READERS, ids=[r.name for r in READERS])
@settings(
    max_examples=200,
    derandomize=True,  # the same files on every run: CI is deterministic
    deadline=None,
    database=None,  # nothing written under the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(data=st.data())
def test_a_hostile_file_is_one_line_and_changes_nothing(worlds, reader, data):
    content = data.draw(variants(reader, load_base(reader, worlds)), label="file")
    problem = attempt(reader, worlds, content)
    assert problem is None, problem


def test_a_checkpoints_model_config_schema_names_every_gpt_config_field():
    """engine/schemas.py ModelConfig types GPTConfig's fields one by one: a field added to one is added to both."""
    import dataclasses

    from engine.schemas import ModelConfig
    from model import GPTConfig

    assert set(ModelConfig.model_fields) == {f.name for f in dataclasses.fields(GPTConfig)}
    defaults = {name: field.default for name, field in ModelConfig.model_fields.items() if not field.is_required()}
    assert defaults == {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name in defaults}


# --- what the fuzz found, pinned ------------------------------------------------------------------------------------


def _copy(worlds, name, tmp_path):
    return shutil.copytree(worlds[name], tmp_path / name)


def _edit_json(path, edit):
    with open(path) as f:
        value = json.load(f)
    edit(value)
    with open(path, "w") as f:
        json.dump(value, f)


def _checkpoint(run) -> str:
    out = run / "out"
    return str(out / next(n for n in sorted(os.listdir(out)) if n.startswith("ckpt-")))


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m["lora"].update(base="/etc"), "meta.json: lora.base: string should match pattern"),
        (lambda m: m["lora"].update(rank=10**9), "meta.json: lora.rank: input should be less than or equal to"),
        (lambda m: m["lora"].update(trainable=["nope"]), "meta.json: lora.trainable: 'nope' is not a parameter"),
        (lambda m: m["data"]["chat"]["special"].update({"<|end|>": 99}), "data.chat.special.<|end|>: 99 is outside"),
        (lambda m: m["data"].update(chars="ab"), "data.vocab_size: 13, but chars holds 2 characters"),
        (lambda m: m.update(val_loss="low"), "meta.json: val_loss: input should be a valid number"),
        (lambda m: m["model_config"].update(n_layer=True), "meta.json: model_config: n_layer: input should be"),
    ],
    ids=["lora base elsewhere", "lora rank", "lora trainable", "chat id", "chars", "loss", "bool size"],
)
def test_a_checkpoint_meta_json_is_checked_field_by_field(worlds, tmp_path, edit, fragment):
    from engine.checkpoint import load_model

    path = _checkpoint(_copy(worlds, "run", tmp_path))
    _edit_json(os.path.join(path, "meta.json"), edit)
    with pytest.raises(UserError) as refused:
        load_model(path)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            lambda s: s["scaler"].update(scale=1.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=9),
            "scaler._g",
        ),
        (lambda s: s["optimizers"][0].update(state=[1]), "state.pt: optimizers.0.state: input should be a valid"),
        (lambda s: s["ema"].update({"#updates": torch.tensor(-1)}), "state.pt: ema.#updates: should be a count"),
        (lambda s: s.update(iter_num="3"), "state.pt: iter_num: input should be a valid integer"),
    ],
    ids=["scaler", "optimizer state", "ema count", "iter_num"],
)
def test_a_state_pt_is_checked_entry_by_entry(worlds, tmp_path, edit, fragment):
    from engine.checkpoint import load_state

    path = _checkpoint(_copy(worlds, "run", tmp_path))
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    edit(state)
    torch.save(state, os.path.join(path, "state.pt"))
    with pytest.raises(UserError) as refused:
        load_state(path)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_an_average_of_another_model_is_refused_before_it_is_copied(worlds, tmp_path):
    from engine.checkpoint import load_model

    path = _checkpoint(_copy(worlds, "run", tmp_path))
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    name = next(n for n in state["ema"] if n != "#updates")
    state["ema"][name] = torch.zeros(3)
    torch.save(state, os.path.join(path, "state.pt"))
    with pytest.raises(UserError, match=f"state.pt: ema.{re.escape(name)}: not a parameter of this model"):
        load_model(path, weights="ema")


# --- tokenizer.json: the library's panics and aborts, avoided ------------------------------------------------------

LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|"
    r"\s+"
)
GPT2 = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"  # tiktoken's spelling
O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_tokenizer(worlds, pattern: str) -> str:
    """The world's BPE tokenizer.json with a Split pre-tokenizer of `pattern` before its ByteLevel one, as Llama 3's
    tokenizer.json is built."""
    with open(os.path.join(worlds["files"], "bpe.json")) as f:
        spec = json.load(f)
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, level]}
    return json.dumps(spec)


@pytest.mark.parametrize("pattern", [GPT2, LLAMA3, O200K], ids=["gpt2", "llama3", "o200k"])
def test_the_standard_split_patterns_load(worlds, pattern):
    from engine.tokenization import tokenizer_from_json

    tokenizer = tokenizer_from_json(_split_tokenizer(worlds, pattern), "tokenizer.json")
    assert tokenizer.decode(tokenizer.encode("the king's 123 queens\n\n  ok").ids) == "the king's 123 queens\n\n  ok"


@pytest.mark.parametrize(
    "pattern, fragment",
    [
        ("(a+)+$", "a repeated group holds a quantifier"),
        ("(a|aa)+$", "a repeated group holds a quantifier or an alternation"),
        (r"(a)\1", "backreference"),
        (r"\s*\s*\s*x", "more than two unbounded quantifiers"),
        ("a" * 2000, "2000 characters long"),
    ],
)
def test_a_regex_that_could_backtrack_without_end_is_refused_before_the_library_sees_it(
    worlds, tmp_path, capfd, pattern, fragment
):
    """Oniguruma stops (a+)+$ on 30 letters at its retry limit, and the library panics mid-encode, printing the panic
    to stderr whatever Python does with it: the pattern is refused before it is compiled."""
    from engine.data import Tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text(_split_tokenizer(worlds, pattern))
    with pytest.raises(UserError) as refused:
        Tokenizer({"tokenizer": "tokenizer.json", "path": str(path)}).encode("a" * 30 + "!")
    message = str(refused.value)
    assert message.startswith(f"{path}: pre_tokenizer.pretokenizers.0.pattern.Regex: ") and fragment in message
    assert "\n" not in message and "panicked" not in capfd.readouterr().err


# --- the entry scripts, as subprocesses ------------------------------------------------------------------------------


def run(*argv: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = os.environ.copy()  # keeps TIKTOKEN_CACHE_DIR
    env.pop("RANK", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


PROGRESS = re.compile(r"\d+ examples \[|[\d.?]+ ?(?:examples|tok|it)/s\]")  # bars on stderr are not messages


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_sample_refuses_a_lora_base_outside_the_run(worlds, tmp_path):
    """meta.json names where the frozen base of a LoRA run is: a name beside the checkpoint, never another path."""
    run_dir = _copy(worlds, "run", tmp_path)
    _edit_json(os.path.join(_checkpoint(run_dir), "meta.json"), lambda m: m["lora"].update(base="../../../etc"))
    rehash_checkpoint(_checkpoint(run_dir))
    before = snapshot(str(tmp_path))
    result = run("sample.py", f"--out_dir={run_dir / 'out'}", "--device=cpu", "--max_new_tokens=2")
    assert_one_line(result, "meta.json: lora.base")
    assert snapshot(str(tmp_path)) == before


def test_evaluate_refuses_a_task_file_with_a_label_out_of_range(worlds, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "ab", "choices": ["a", "b"], "label": 5}) + "\n")
    run_dir = _copy(worlds, "run", tmp_path)
    before = snapshot(str(tmp_path))
    result = run(
        "tools/evaluate.py", f"--out_dir={run_dir / 'out'}", "--device=cpu", "--task=choice", f"--task_file={task}"
    )
    assert_one_line(result, f"{task}:1: label: 5 for 2 choices")
    assert snapshot(str(tmp_path)) == before


def test_train_refuses_a_dataset_meta_json_with_a_wrong_type(worlds, tmp_path):
    data = _copy(worlds, "dataset", tmp_path) / "data"
    _edit_json(data / "tiny" / "meta.json", lambda m: m.update(vocab_size="13"))
    before = snapshot(str(tmp_path))
    result = run("train.py", f"--data_root={data}", "--dataset=tiny", f"--out_dir={tmp_path / 'out'}", "--device=cpu")
    assert_one_line(result, "meta.json: vocab_size: input should be a valid integer")
    assert snapshot(str(tmp_path)) == before


def test_from_nanogpt_never_writes_where_a_checkpoint_says(worlds, tmp_path):
    """An untrusted file never names where we write: a ckpt.pt whose config names an absolute dataset directory made
    prepare/from_nanogpt.py write meta.json into it."""
    elsewhere = shutil.copytree(os.path.join(worlds["nano"], "data", "nano"), tmp_path / "elsewhere")
    ckpt = torch.load(os.path.join(worlds["nano"], "ckpt.pt"), weights_only=True)
    ckpt["config"]["dataset"] = str(elsewhere)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    before = snapshot(str(tmp_path))
    result = run("prepare/from_nanogpt.py", str(tmp_path / "ckpt.pt"), f"--out_dir={tmp_path / 'out'}")
    assert_one_line(result, "ckpt.pt: config.dataset: should be a plain file or directory name")
    assert snapshot(str(tmp_path)) == before and not (elsewhere / "meta.json").exists()


def test_from_nanogpt_checks_model_args_before_allocating(worlds, tmp_path):
    ckpt = torch.load(os.path.join(worlds["nano"], "ckpt.pt"), weights_only=True)
    ckpt["model_args"]["n_layer"] = 10**12
    torch.save(ckpt, tmp_path / "ckpt.pt")
    shutil.copytree(os.path.join(worlds["nano"], "data"), tmp_path / "data")
    before = snapshot(str(tmp_path))
    result = run(os.path.join(ROOT, "prepare", "from_nanogpt.py"), "ckpt.pt", "--out_dir=out", cwd=str(tmp_path))
    assert_one_line(result, "ckpt.pt: model_args: this model needs at least")
    assert snapshot(str(tmp_path)) == before


def test_prepare_text_refuses_a_tokenizer_json_that_would_panic(worlds, tmp_path):
    """The reused tokenizer.json of prepare/text.py --tokenizer=<file>: before, its regex panicked the library in the
    worker processes, a Rust backtrace instead of one line."""
    hostile = tmp_path / "hostile.json"
    hostile.write_text(_split_tokenizer(worlds, "(a+)+$"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!\n" * 50)
    before = snapshot(str(tmp_path))
    result = run(
        "prepare/text.py", f"--input={corpus}", f"--out={tmp_path / 'data'}", f"--tokenizer={hostile}", "--num_proc=1"
    )
    assert "panicked" not in result.stderr
    assert_one_line(result, f"{hostile}: pre_tokenizer.pretokenizers.0.pattern.Regex: a repeated group holds")
    assert snapshot(str(tmp_path)) == before


def test_a_nanogpt_meta_pkl_with_an_absurd_vocabulary_is_one_line(worlds, tmp_path):
    """nanoGPT's meta.pkl is read with a data-only unpickler; its vocab_size was then looped over: 10**12 hung."""
    from from_nanogpt import import_dataset

    data = shutil.copytree(os.path.join(worlds["nano"], "data", "nano"), tmp_path / "nano")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 10**12, "itos": {0: "a"}, "stoi": {"a": 0}}, f)
    with pytest.raises(UserError, match="meta.pkl: vocab_size: input should be less than or equal to 65536"):
        import_dataset(str(data))
    assert not (data / "meta.json").exists()
