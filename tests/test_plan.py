"""tools/plan.py and engine/scaling_law.py: a budget becomes a run of that many FLOPs (as tools/sizing.py counts
them); the fitter recovers the constants synthetic losses were made with; a sweep runs, is fitted and plans; bad
budgets, files and runs are one line."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from engine.configurator import resolve_options
from engine.scaling_law import Law, bootstrap, fit
from tools import plan

PINS = ["--dataset=tiny_char", "--block_size=64", "--device=cpu"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return resolve_options(plan.TRAIN_PY, ["--block_size=256", "--vocab_size=50304", "--pos_embedding=rope"])


@pytest.mark.parametrize("flops", [1e15, 3e17, 1e19, 2e21])
@pytest.mark.parametrize("tokens_per_param", [20.0, 5.0])
def test_the_planned_run_spends_the_budget_as_sizing_counts_it(cfg, flops, tokens_per_param):
    opts = plan.PlanOptions(num_gpus=8, tokens_per_param=tokens_per_param)
    sizes = plan.Sizes(vars(cfg), 50304, opts)
    p = plan.plan(flops, cfg, opts, sizes, None, 312e12)
    o = p["options"]
    tokens_per_iter = o["batch_size"] * o["gradient_accumulation_steps"] * cfg.block_size
    model = plan.build_meta_model(p["size"].config)
    spent = o["max_iters"] * tokens_per_iter * model.flops_per_token(cfg.block_size)  # sizing.py's 6N + 12LCT
    assert spent == pytest.approx(flops, rel=0.03)
    assert o["gradient_accumulation_steps"] % 8 == 0 and o["max_iters"] >= 50
    # DeepSeek LLM's rules (eq. 1) on C as they count it, M x D with M = 72·L·d² + 12·L·d·s (their section 3.1: no
    # embeddings, no output layer): the batch at most its target, short of it by less than a sequence per GPU and
    # per accumulation step; the learning rate their fit
    tokens = o["max_iters"] * tokens_per_iter
    d, s = o["n_embd"], cfg.block_size
    compute = (72 * o["n_layer"] * d**2 + 12 * o["n_layer"] * d * s) * flops / p["size"].flops_per_token
    target = min(0.292 * compute**0.3271, tokens / 50)
    assert target - (8 + o["gradient_accumulation_steps"]) * s < tokens_per_iter <= target * 1.001  # (M: no norms)
    assert o["learning_rate"] == pytest.approx(0.3118 * compute**-0.125, rel=5e-3)  # (3 significant digits)
    assert o["min_lr"] == pytest.approx(o["learning_rate"] / 10, rel=1e-2)
    assert o["warmup_iters"] == max(10, round(0.01 * o["max_iters"]))

    # the depth is the one nearest the target ratio: its neighbours are farther from it
    def off(depth):
        s = sizes[depth]
        return abs(math.log(flops / s.flops_per_token / s.params / tokens_per_param))

    assert off(p["size"].depth) <= min(off(p["size"].depth - 1) if p["size"].depth > 1 else 9, off(p["size"].depth + 1))


def synthetic(law: Law, budgets, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d = [], []
    for c in budgets:
        n_opt, _ = law.optimal(c)
        for f in np.geomspace(1 / 4, 4, 6):
            n.append(n_opt * f)
            d.append(c / 6 / (n_opt * f))
    n, d = np.array(n), np.array(d)
    return n, d, law.loss(n, d) * np.exp(rng.normal(0, noise, len(n)))


def test_the_fitter_recovers_known_constants_from_noisy_losses():
    true = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022's fit
    n, d, loss = synthetic(true, [1e17, 1e18, 1e19, 1e20, 1e21], noise=0.002)
    for c in (1e18, 1e22):  # the closed-form optimum is where the loss along C = 6ND is lowest (a fine grid)
        grid = np.geomspace(1e6, 1e12, 200_001)
        assert true.optimal(c)[0] == pytest.approx(grid[np.argmin(true.loss(grid, c / 6 / grid))], rel=1e-3)
    law = fit(n, d, loss)
    assert law.alpha == pytest.approx(true.alpha, abs=0.04) and law.beta == pytest.approx(true.beta, abs=0.04)
    assert law.E == pytest.approx(true.E, rel=0.05)
    for c in (1e19, 1e23):  # what the plan uses: the compute-optimal allocation, and the loss there
        (n_true, d_true), (n_fit, d_fit) = true.optimal(c), law.optimal(c)
        assert n_fit == pytest.approx(n_true, rel=0.3)
        assert law.loss(n_fit, d_fit) == pytest.approx(true.loss(n_true, d_true), rel=0.01)
    laws = bootstrap(law, n, d, loss, samples=20)
    low, high = np.percentile([x.alpha for x in laws], [2.5, 97.5])
    assert len(laws) >= 15 and low < law.alpha < high and high - low < 0.2


def run_plan(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools/plan.py"), *args], cwd=cwd, capture_output=True,
                          text=True)  # fmt: skip


@pytest.mark.parametrize(
    "args,words",
    [
        (["--vocab_size=65"], "give one budget"),
        (["--flops=1e18", "--gpu_hours=2", "--vocab_size=65"], "give one budget"),
        (["--flops=lots", "--vocab_size=65"], "not a number"),
        (["--gpu_hours=-3", "--vocab_size=65"], "more than 0 FLOPs"),
        (["--flops=1e6", "--vocab_size=65"], "too small"),
        (["--flops=1e18", "--n_layer=12", "--vocab_size=65"], "plan chooses n_layer"),
        (["--flops=1e18", "--learning_rate=1e-3", "--max_iters=9", "--vocab_size=65"], "learning_rate, max_iters"),
        (["--sweep", "--flops=1e12", "--out=x.py", "--vocab_size=65"], "a sweep's commands go to --sweep_script"),
        (["--flops=1e18", "--gpu=TPU9", "--vocab_size=65"], "unknown --gpu"),
        (["--flops=1e18", "--law=/nonexistent.json", "--vocab_size=65"], "cannot read /nonexistent.json"),
        (["--fit", "/nonexistent-sweep-*"], "no run directory"),
        (["--sweep", "--vocab_size=65"], "--sweep needs --flops"),
        (["--flops=1e15", "--tokens_available=0", "--vocab_size=65"], "give a positive count"),
        (["--flops=1e15", "--tokens_per_param=0", "--vocab_size=65"], "--tokens_per_param must be > 0"),
        (["--flops=1e15", "--aspect=24", "--head_size=16", "--vocab_size=65"], "multiple of --head_size"),
        (["--flops=1e15", "--n_kv_head=256", "--vocab_size=65"], "multiple of n_kv_head"),
        (["--fit", "/", "--plot=/nonexistent/x.png"], "does not exist"),
        (["--fit", "/", "--plot=law.foo"], "name a picture matplotlib writes"),
        (["--fit", "/", "--plot=x.png", "--fit_out=x.png"], "--fit_out, --plot must be different files"),
        (["--flops=1e15", "--law=x.py", "--out=x.py", "--vocab_size=65"], "--law, --out must be different files"),
        (["--sweep", "--flops=-1", "--vocab_size=65"], "each more than 0"),
        (["--sweep", "--flops=1e12,1.0004e12", "--vocab_size=65"], "different in its first 3 digits"),
        (["--sweep", "--flops=,", "--vocab_size=65"], "give the sweep's budgets"),
        (["--sweep", "--gpu_hours=3", "--vocab_size=65"], "--sweep takes each run's budget as --flops"),
    ],
)
def test_a_bad_budget_or_a_missing_file_is_one_line(args, words, tmp_path):
    done = run_plan(*args, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "text,words",
    [
        (b'{"law": {"E": 1.0, "A": -5, "B": 1.0, "alpha": 0.3, "beta": 0.3}}', "law.A: input should be greater than 0"),
        (b'{"law": "\xff\xfe"}', "not UTF-8 text"),
        (b'{"law": {"E": 1e308, "A": 1e308, "B": 1e308, "alpha": 1e-300, "beta": 1e-300}}', "no finite loss"),
    ],
)
def test_a_hostile_law_file_is_one_line(tmp_path, text, words):
    law = tmp_path / "law.json"
    law.write_bytes(text)
    done = run_plan("--flops=1e18", f"--law={law}", "--vocab_size=65", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and words in lines[0] and "tools/plan.py --fit" in lines[0], lines


def test_gqa_plans_only_depths_whose_heads_its_kv_heads_divide(tmp_path):
    cfg = resolve_options(plan.TRAIN_PY, ["--vocab_size=65", "--n_kv_head=4", "--block_size=256"])
    opts = plan.PlanOptions(aspect=16, head_size=16)
    sizes = plan.Sizes(vars(cfg), 65, opts)
    assert sizes[3] is None and sizes[4].config.n_head == 4 and sizes.smallest().depth == 4
    assert plan.plan(3e15, cfg, opts, sizes, None, 312e12)["options"]["n_head"] % 4 == 0
    script = tmp_path / "sweep.sh"
    done = run_plan("--sweep", "--flops=1e14", "--sizes=3", "--vocab_size=65", "--n_kv_head=4", "--aspect=16",
                    "--head_size=16", "--block_size=256", f"--sweep_script={script}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    depths = [int(a.split("=")[1]) for a in script.read_text().split() if a.startswith("--n_layer=")]
    assert len(depths) == 3 and all(d % 4 == 0 for d in depths) and len(set(depths)) == 3


def test_the_memory_of_a_gpu_is_its_own_not_a_namesake_s():
    assert plan.gpu_memory(plan.PlanOptions(gpu="GH200")) == 96 * 2**30  # (H200 is inside its name)
    assert plan.gpu_memory(plan.PlanOptions(gpu="NVIDIA H200")) == 141 * 2**30


def test_more_gpus_than_the_budget_s_batch_wants_is_said(tmp_path):
    done = run_plan("--flops=1e17", "--num_gpus=4096", "--gpu=H100", "--vocab_size=65", cwd=tmp_path)
    assert done.returncode == 0 and "warning: one sequence per GPU is 4,194,304 tokens per step" in done.stdout


def test_too_little_data_is_said_with_the_epochs_and_a_budget_the_data_holds(tmp_path):
    done = run_plan("--flops=1e18", "--vocab_size=50304", "--tokens_available=1e8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "epoch(s)" in done.stdout and "warning: the data is too small for this budget" in done.stdout
    smaller = done.stdout.split("plan for at most ")[1].split(" FLOPs")[0]
    done = run_plan(f"--flops={smaller}", "--vocab_size=50304", "--tokens_available=1e8", cwd=tmp_path)
    epochs = float(done.stdout.split("the plan reads ")[1].split(" epoch")[0])
    assert 3 < epochs <= 4 and "warning" not in done.stdout


def test_the_preset_written_holds_a_positional_preset_s_settings_and_the_plan(tmp_path):
    preset = tmp_path / "planned.py"
    done = run_plan(os.path.join(ROOT, "config/train_shakespeare_char.py"), "--flops=1e14", "--vocab_size=65",
                    f"--out={preset}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    planned = resolve_options(plan.TRAIN_PY, [str(preset)])
    shakespeare = resolve_options(plan.TRAIN_PY, [os.path.join(ROOT, "config/train_shakespeare_char.py")])
    assert (planned.dataset, planned.block_size, planned.dropout) == (shakespeare.dataset, 256, shakespeare.dropout)
    command = done.stdout.split("\n\n")[1].splitlines()[0].split()
    for arg in (a for a in command if a.startswith("--n_layer=") or a.startswith("--max_iters=")):
        key, value = arg[2:].split("=")
        assert getattr(planned, key) == int(value)


def test_a_sweep_s_runs_have_their_own_directories(tmp_path):
    script = tmp_path / "sweep.sh"
    done = run_plan("--sweep", "--flops=1e12,1.4e12", "--sizes=3", "--vocab_size=65", "--block_size=64",
                    "--aspect=16", "--head_size=16", f"--sweep_script={script}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out_dirs = [a for line in script.read_text().splitlines() for a in line.split() if a.startswith("--out_dir=")]
    assert len(out_dirs) == 6 == len(set(out_dirs))


@pytest.mark.slow
def test_a_sweep_runs_fits_and_plans(char_data, tmp_path):
    """A tiny IsoFLOP sweep (2 budgets x 3 sizes) written as a script, run, fitted (constants, the PNG, the law's
    file), and the law then plans a run with an expected loss."""
    pins = [f"--data_root={char_data}", "--dataset=tiny_char", "--block_size=32", "--device=cpu", "--compile=False"]
    pins += ["--dtype=float32", "--eval_iters=2", "--aspect=8", "--head_size=8"]
    prefix, script = tmp_path / "run", tmp_path / "sweep.sh"
    done = run_plan("--sweep", "--flops=2e9,6e9", "--sizes=3", f"--sweep_prefix={prefix}", f"--sweep_script={script}",
                    *pins, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert script.read_text().count("train.py") == 6 and f"--out_dir={prefix}-2e+09-d" in script.read_text()
    subprocess.run(["sh", str(script)], cwd=ROOT, check=True, capture_output=True)  # as a user runs it: from here
    done = run_plan("--fit", *sorted(str(p) for p in tmp_path.glob("run-*")), "--bootstrap=5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "fitted L(N, D)" in done.stdout and "tokens per parameter" in done.stdout
    assert (tmp_path / "scaling_law.png").stat().st_size > 0
    done = run_plan("--law=scaling_law.json", "--flops=2e10", *pins, "--out=planned.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "expected final loss" in done.stdout and "python train.py" in done.stdout
    preset = (tmp_path / "planned.py").read_text()
    assert "n_layer = " in preset and "dataset = 'tiny_char'" in preset

    # runs --fit cannot read D = iterations x batch from, or that are not the sweep's, are refused in one line; a
    # sweep run resumed after an interruption is its own run still
    import json
    import shutil

    from conftest import rehash_checkpoint

    from engine.checkpoint import find_checkpoint

    runs = sorted(str(p) for p in tmp_path.glob("run-*"))
    for change, words in [
        ({"init_from": "gpt2"}, "started from gpt2, not from scratch"),
        ({"batch_warmup_tokens": 4096}, "does not say how many tokens it trained on"),
        ({"dataset": "other_char"}, "the runs trained on different datasets"),
        ({"init_from": "resume"}, None),
    ]:
        odd = tmp_path / "odd"
        shutil.rmtree(odd, ignore_errors=True)
        shutil.copytree(runs[0], odd)
        checkpoint = find_checkpoint(str(odd), log=lambda *a, **k: None)
        meta = json.loads(open(os.path.join(checkpoint, "meta.json")).read())
        meta["train_config"] |= change
        with open(os.path.join(checkpoint, "meta.json"), "w") as f:
            json.dump(meta, f)
        rehash_checkpoint(checkpoint)
        done = run_plan("--fit", *runs, str(odd), "--bootstrap=0", "--fit_out=odd.json", "--plot=odd.png", cwd=tmp_path)
        if words is None:
            assert done.returncode == 0 and f"on {len(runs) + 1} runs" in done.stdout, done.stderr
        else:
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr
