"""The configurator: precedence, coercion by field type, errors that say what to do, --help, and the repo's presets."""

import ast
import dataclasses
import glob
import inspect
import io
import json
import os
import runpy
import textwrap
import tokenize
from dataclasses import dataclass

import pytest

import sample
import train
from engine.configurator import describe_fields, parse_config, resolve_options
from engine.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Small:
    batch_size: int = 12  # sequences per step
    learning_rate: float = 6e-4  # peak learning rate
    compile: bool = True  # torch.compile the model
    dataset: str = "openwebtext"  # dataset name
    vocab_size: int | None = 50304  # none = the dataset's


def write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_when_nothing_is_given():
    assert parse_config(Small, []) == Small()


def test_precedence_defaults_then_presets_in_order_then_command_line(tmp_path):
    a = write(tmp_path / "a.py", "batch_size = 1\nlearning_rate = 0.1\ndataset = 'a'\n")
    b = write(tmp_path / "b.py", "learning_rate = 0.2\ndataset = 'b'\n")
    cfg = parse_config(Small, [a, b, "--dataset=cli"])
    assert cfg == Small(batch_size=1, learning_rate=0.2, dataset="cli")  # compile, vocab_size: defaults
    assert parse_config(Small, [b, a]).learning_rate == 0.1  # a later preset wins over an earlier one


def test_command_line_beats_a_preset_given_after_it(tmp_path):
    # The documented order is defaults < presets < --key=value, whatever the positions on the command line.
    preset = write(tmp_path / "p.py", "batch_size = 1\n")
    assert parse_config(Small, ["--batch_size=32", preset]).batch_size == 32


def test_precedence_with_train_config(tmp_path):
    preset = write(tmp_path / "p.py", "batch_size = 4\nmax_iters = 100\n")
    cfg = parse_config(train.TrainConfig, [preset, "--max_iters=7"])
    assert (cfg.batch_size, cfg.max_iters) == (4, 7)
    assert cfg.learning_rate == train.TrainConfig().learning_rate


@pytest.mark.parametrize(
    "arg, field, expected, kind",
    [
        ("--learning_rate=1", "learning_rate", 1.0, float),
        ("--learning_rate=3e-4", "learning_rate", 3e-4, float),
        ("--compile=false", "compile", False, bool),
        ("--compile=False", "compile", False, bool),
        ("--compile=True", "compile", True, bool),
        ("--batch_size=1e3", "batch_size", 1000, int),
        ("--batch_size=64", "batch_size", 64, int),
        ("--vocab_size=none", "vocab_size", None, type(None)),
        ("--vocab_size=None", "vocab_size", None, type(None)),
        ("--vocab_size=65", "vocab_size", 65, int),
        ("--dataset=shakespeare_char", "dataset", "shakespeare_char", str),
    ],
)
def test_values_are_coerced_by_field_type(arg, field, expected, kind):
    value = getattr(parse_config(Small, [arg]), field)
    assert value == expected and type(value) is kind


def test_train_config_coercion():
    cfg = parse_config(
        train.TrainConfig, ["--learning_rate=1", "--compile=false", "--max_iters=1e3", "--vocab_size=none"]
    )
    assert type(cfg.learning_rate) is float and cfg.learning_rate == 1.0
    assert cfg.compile is False
    assert type(cfg.max_iters) is int and cfg.max_iters == 1000
    assert cfg.vocab_size is None


def test_preset_values_are_coerced_too(tmp_path):
    preset = write(tmp_path / "p.py", "learning_rate = 1\nbatch_size = 2e1\n")
    cfg = parse_config(Small, [preset])
    assert type(cfg.learning_rate) is float and type(cfg.batch_size) is int and cfg.batch_size == 20


def test_unknown_key_suggests_the_close_match():
    with pytest.raises(UserError, match="--batch_size") as e:
        parse_config(train.TrainConfig, ["--batch_sise=3"])
    assert "batch_sise" in str(e.value)


def test_unknown_public_name_in_a_preset_is_an_error(tmp_path):
    preset = write(tmp_path / "p.py", "batch_size = 4\nlearnig_rate = 1e-3\n")
    with pytest.raises(UserError, match="learnig_rate") as e:
        parse_config(Small, [preset])
    assert "--learning_rate" in str(e.value)


def test_preset_may_import_and_use_modules(tmp_path):
    # nanoGPT's finetune preset: wandb_run_name = 'ft-' + str(time.time())
    preset = write(
        tmp_path / "p.py",
        """
        import time
        import math as _math

        wandb_run_name = "ft-" + str(int(time.time()))
        _scratch = _math.pi  # private names are ignored
        """,
    )
    cfg = parse_config(train.TrainConfig, [preset])
    assert cfg.wandb_run_name.startswith("ft-") and cfg.wandb_run_name[3:].isdigit()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))), ids=os.path.basename)
def test_every_repo_preset_parses_against_train_config(path):
    names = {
        node.targets[0].id
        for node in ast.parse(open(path).read()).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    cfg = parse_config(train.TrainConfig, [path])
    assert names, "a preset sets something"
    own = runpy.run_path(path)  # the preset's own values, to compare with
    for name in names:
        assert getattr(cfg, name) == own[name], name


def test_repo_presets_exist():
    presets = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "config", "*.py"))}
    assert {"train_shakespeare_char.py", "train_gpt2.py", "finetune_shakespeare.py", "eval_gpt2.py"} <= presets


def source_comments(cls) -> dict[str, str]:
    """Each field's `# comment` read with Python's tokenizer, wherever ruff format put it within the statement."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments_by_line = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    result = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign):
            lines = range(node.lineno, node.end_lineno + 1)
            found = [comments_by_line[n] for n in lines if n in comments_by_line]
            if found:
                result[node.target.id] = " ".join(found)
    return result


@pytest.mark.parametrize("cls", [Small, train.TrainConfig, sample.SampleConfig], ids=lambda c: c.__name__)
def test_help_lists_every_field_with_its_comment_and_exits_0(cls, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(cls, ["--help"], usage="usage line")
    assert e.value.code == 0
    out = capsys.readouterr().out
    comments = source_comments(cls)
    assert set(comments) == {f.name for f in dataclasses.fields(cls)}, "every field has a comment in the source"
    missing = []
    for f in dataclasses.fields(cls):
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"--{f.name}=")), None)
        if line is None or repr(f.default) not in line or comments[f.name] not in line:
            missing.append(f.name)
    assert not missing, f"--help lacks these fields, defaults or comments: {missing}\n{out}"


def test_short_help_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Small, ["-h"])
    assert e.value.code == 0
    assert "--batch_size=12" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--max_iters=abc"], "max_iters"),
        (["--max_iters=1.5"], "max_iters"),
        (["--learning_rate=fast"], "learning_rate"),
        (["--compile=maybe"], "compile"),
        (["--compile"], "--compile=VALUE"),
        (["--batch_size=0"], "batch_size"),  # TrainConfig's own validation, turned into a UserError
        (["no_such_preset.py"], "not found"),
    ],
)
def test_bad_values_are_user_errors(argv, match):
    with pytest.raises(UserError, match=match):
        parse_config(train.TrainConfig, argv)


def test_preset_with_a_syntax_error_is_a_user_error(tmp_path):
    preset = write(tmp_path / "p.py", "batch_size = = 4\n")
    with pytest.raises(UserError, match="line 1"):
        parse_config(Small, [preset])


NANOGPT_TRAIN_KEYS = """
out_dir eval_interval log_interval eval_iters eval_only always_save_checkpoint init_from
wandb_log wandb_project wandb_run_name
dataset gradient_accumulation_steps batch_size block_size
n_layer n_head n_embd dropout bias
learning_rate max_iters weight_decay beta1 beta2 grad_clip
decay_lr warmup_iters lr_decay_iters min_lr
backend device dtype compile seed
""".split()  # nanoGPT train.py's configurable globals


def test_nanogpt_train_keys_are_all_train_config_fields():
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert len(NANOGPT_TRAIN_KEYS) == 34
    assert set(NANOGPT_TRAIN_KEYS) - fields == set()


def test_train_config_defaults_are_nanogpt_gpt2_defaults():
    # nanoGPT's train.py defaults (GPT-2 124M on OpenWebText), which its presets are written against.
    cfg = train.TrainConfig()
    expected = dict(
        eval_interval=2000,
        eval_iters=200,
        gradient_accumulation_steps=40,
        batch_size=12,
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        learning_rate=6e-4,
        max_iters=600000,
        weight_decay=1e-1,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        warmup_iters=2000,
        min_lr=6e-5,
    )
    assert {k: getattr(cfg, k) for k in expected} == expected
    # nanoGPT's lr_decay_iters=600000 equals its max_iters; here none follows max_iters, so a preset that shortens
    # max_iters still decays (in nanoGPT it silently would not)
    assert cfg.lr_decay_iters is None


@pytest.mark.parametrize(
    "arg",
    ["--temperature=-0.1", "--top_p=0", "--top_p=1.5", "--top_p=-1", "--top_k=0", "--top_k=-3", "--num_samples=0"],
)
def test_sample_config_validation_is_a_user_error(arg):
    with pytest.raises(UserError, match=arg[2:].split("=")[0]):
        parse_config(sample.SampleConfig, [arg])


def test_sample_config_accepts_the_edges():
    cfg = parse_config(sample.SampleConfig, ["--temperature=0", "--top_p=1", "--top_k=1", "--top_p=none"])
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (0.0, 1, None)
    assert parse_config(sample.SampleConfig, ["--top_k=none"]).top_k is None


def test_a_renamed_key_still_works_in_a_preset_and_on_the_command_line(tmp_path):
    # checkpoint_every became recompute_every; every saved train_config.py of an older run still holds the old name
    preset = tmp_path / "old_run_config.py"
    preset.write_text("checkpoint_every = 3\n")
    assert parse_config(train.TrainConfig, [str(preset)]).recompute_every == 3
    assert parse_config(train.TrainConfig, ["--checkpoint_every=2"]).recompute_every == 2


def test_print_config_prints_the_resolved_config_as_json_and_exits_0(tmp_path, capsys):
    preset = write(tmp_path / "p.py", "batch_size = 1\ndataset = 'p'\n")
    with pytest.raises(SystemExit) as e:
        parse_config(Small, [preset, "--print_config", "--vocab_size=none"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == dataclasses.asdict(
        Small(batch_size=1, dataset="p", vocab_size=None)
    )
    with pytest.raises(UserError, match="batch_size"):  # the config is checked as a run checks it, then printed
        parse_config(Small, ["--batch_size=abc", "--print_config"])
    assert capsys.readouterr().out == ""
    assert describe_fields(Small).splitlines()[-1].split()[0] == "--print_config"  # and --help says so


def test_resolve_options_is_train_pys_own_resolution(tmp_path):
    """A tool taking train.py's command line gets what train.py resolves: defaults < presets < --key=value, coerced
    by train.py's own field types, without importing train.py; a bad option is train.py's own one line."""
    preset = write(tmp_path / "p.py", "batch_size = 4\nmax_iters = 100\n")
    argv = [preset, "--max_iters=7", "--learning_rate=1", "--vocab_size=none"]
    got = resolve_options(os.path.join(ROOT, "train.py"), argv)
    expected = dataclasses.asdict(parse_config(train.TrainConfig, argv))
    assert vars(got) == expected and type(got.learning_rate) is float and got.vocab_size is None
    assert (got.batch_size, got.max_iters) == (4, 7)
    for bad in (["--batch_size=0"], ["--max_iters=abc"], ["--batch_sise=3"]):
        with pytest.raises(UserError) as in_process:
            parse_config(train.TrainConfig, bad)
        with pytest.raises(UserError) as resolved:
            resolve_options(os.path.join(ROOT, "train.py"), bad)
        assert str(resolved.value) == str(in_process.value) and "\n" not in str(resolved.value)
