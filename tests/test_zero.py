"""ZeRO stages, CPU offload, hybrid sharding, and Muon and LoRA under sharding, on CPU with gloo: each gives the
losses of one process with the same global batch (only the order of float sums differs between them), and its
checkpoint resumes in one process."""

import json
import os
import subprocess
import sys

import pytest
from test_distributed import CONFIG, rank_logs, torchrun

import train
from engine.checkpoint import find_checkpoint, is_sharded, read_meta

pytestmark = pytest.mark.slow


def losses(out) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def options(char_data, out, *extra) -> list[str]:
    return [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *CONFIG, *extra]


# (the mode's flags, processes, the one-process run's flags that it must equal)
MODES = {
    "zero1": (["--zero_stage=1"], 2, []),
    "zero2": (["--zero_stage=2"], 2, []),
    "zero3": (["--zero_stage=3"], 2, []),
    "cpu_offload": (["--fsdp=True", "--cpu_offload=True"], 2, []),
    "hsdp_2x2": (["--fsdp=True", "--hsdp=2"], 4, []),
    "muon_zero1": (["--zero_stage=1", "--optimizer=muon"], 2, ["--optimizer=muon"]),
    "muon_fsdp": (["--fsdp=True", "--optimizer=muon"], 2, ["--optimizer=muon"]),
    "muon_hsdp_2x2": (["--fsdp=True", "--hsdp=2", "--optimizer=muon"], 4, ["--optimizer=muon"]),
    "lora_fsdp": (["--fsdp=True", "--lora_rank=4"], 2, ["--lora_rank=4"]),
    "lora_ema_zero2": (["--zero_stage=2", "--lora_rank=4", "--ema_decay=0.9"], 2, ["--lora_rank=4", "--ema_decay=0.9"]),
}


@pytest.mark.parametrize("mode", MODES)
def test_each_way_of_sharding_gives_the_losses_of_one_process(char_data, tmp_path, mode):
    flags, nproc, same = MODES[mode]
    batch = ["--gradient_accumulation_steps=4"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    train.main(options(char_data, single, *batch, *same))
    result = torchrun(tmp_path, *options(char_data, sharded, *batch, *flags), nproc=nproc)
    assert result.returncode == 0, "\n".join(rank_logs(tmp_path, "stderr", nproc))[-3000:]
    assert len(losses(sharded)) == 6
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-4, abs=1e-5)
    path = find_checkpoint(str(sharded))
    assert is_sharded(path) == ("--zero_stage=1" not in flags)  # ZeRO-1 keeps the model whole: DDP's one file
    if "--lora_rank=4" in flags:  # the adapters alone, the base written once beside them
        assert read_meta(path)["lora"]["base"] in os.listdir(sharded)
    # and one process goes on from it as from its own checkpoint
    for out in (single, sharded):
        assert train.main(options(char_data, out, *batch, *same, "--init_from=resume", "--max_iters=8")) == 0
    assert len(losses(sharded)) == 8
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-4, abs=1e-5)


def test_sharding_flags_that_do_not_fit_together_are_one_line(char_data, tmp_path):
    for flags, message in (
        (["--cpu_offload=True"], "cpu_offload and hsdp need fsdp=True"),
        (["--hsdp=2"], "cpu_offload and hsdp need fsdp=True"),
        (["--fsdp=True", "--zero_stage=1"], "zero_stage=1 is without fsdp"),
        (["--zero_stage=4"], "zero_stage must be 0 \\(off\\), 1, 2 or 3"),
    ):
        with pytest.raises(Exception, match=message):
            train.main(options(char_data, tmp_path / "out", *flags))


PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from engine.fsdp import shard_model
from engine.optim import setup_training
from engine.runtime import setup_runtime
from model import GPT, GPTConfig

rt = setup_runtime("cpu", "float32")
config = GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16)
x = torch.randint(0, 32, (2, 8))
found = {{}}
model = GPT(config)
opt = setup_training(model, "adamw", 0.1, 1e-3, (0.9, 0.95), "cpu", zero=True)[0]
model(x, x)[1].backward()
opt.step()
found["zero1_states"] = [len(opt.optim.state), len(list(model.parameters()))]
for stage, hsdp in ((2, 0), (3, 0), (3, 2)):
    model = GPT(config)
    shard_model(model, rt, stage=stage, hsdp=hsdp)
    model(x, x)
    p = model.transformer.h[0].attn.c_attn.weight
    mesh = list(p.device_mesh.shape) if hasattr(p, "device_mesh") else None
    found[f"stage{{stage}}_hsdp{{hsdp}}"] = [mesh is not None, mesh]
print(json.dumps(found) if rt.rank == 0 else "")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_each_stage_shards_what_it_says(tmp_path):
    """Not only the same losses: ZeRO-1 keeps the optimizer state of about a quarter of the parameters on each of
    4 ranks; after a forward pass ZeRO-2 holds the blocks' weights gathered (plain tensors), ZeRO-3 resharded
    (DTensors over the 4 ranks), and hybrid sharding over a 2 x 2 mesh."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(script)]
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    owned, total = found["zero1_states"]
    assert 0 < owned < total / 2
    assert found["stage2_hsdp0"] == [False, None]
    assert found["stage3_hsdp0"] == [True, [4]]
    assert found["stage3_hsdp2"] == [True, [2, 2]]
