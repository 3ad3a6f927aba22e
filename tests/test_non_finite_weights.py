"""Class 9 of "Nothing lost, by construction": non-finite weights in a checkpoint.

Training never writes one, but a damaged or foreign checkpoint may hold NaN or infinity: sampling would crash in
multinomial, exporting would write them on, evaluating would print NaN. Every reader refuses in one line naming the
tensor, whichever tensor it is, raw weights or the weight average, and writes nothing."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_inputs import assert_user_error, run
from test_writes_stay_inside import snapshot

from engine.checkpoint import load_model, load_state, save_checkpoint
from engine.errors import UserError
from model import GPT, GPTConfig

CONFIG = GPTConfig(block_size=8, vocab_size=3, n_layer=1, n_head=1, n_embd=8)
NAMES = [name for name, _ in GPT(CONFIG).named_parameters()]


def damaged(out, name: str, index: int, value: float, where: str = "raw") -> str:
    """out_dir holding one checkpoint over "abc" whose parameter `name` holds `value` at flat `index`, in the raw
    weights or in the weight average (state.pt's ema entry)."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    params = dict(model.named_parameters())
    average = {n: p.detach().clone() for n, p in params.items()}
    target = params[name].data if where == "raw" else average[name]
    target.view(-1)[index % target.numel()] = value
    data = {"tokenizer": "char", "vocab_size": 3, "dtype": "uint16", "eot_id": None, "chars": "abc"}
    meta = {"model_config": dataclasses.asdict(model.config), "train_config": {}, "data": data, "val_loss": 1.0}
    state = {
        "optimizers": [],
        "scaler": {},
        "iter_num": 1,
        "best_val_loss": 1.0,
        "ema": average | {"#updates": torch.tensor(1)},
    }
    save_checkpoint(str(out), 1, model, state, meta)
    return str(out)


@settings(derandomize=True, deadline=None, max_examples=60, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(NAMES),
    index=st.integers(0, 10**6),
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    where=st.sampled_from(["raw", "ema"]),
)
def test_any_non_finite_weight_is_one_line_naming_its_tensor(tmp_path_factory, name, index, value, where):
    out = damaged(tmp_path_factory.mktemp("ckpt"), name, index, value, where)
    path = f"{out}/ckpt-0000001"
    assert set(load_state(path)["ema"]) >= set(NAMES)
    with pytest.raises(UserError, match=f"non-finite weights \\(NaN or inf in {name}\\)"):
        load_model(path, weights=where)
    if where == "ema":  # the raw weights are fine, and load
        load_model(path)


@pytest.mark.parametrize("script", ["sample.py", "tools/export_hf.py", "tools/evaluate.py", "tools/attention.py"])
def test_every_reader_of_a_checkpoint_with_non_finite_weights_says_so_in_one_line(tmp_path, script):
    out = damaged(tmp_path / "out", "transformer.h.0.mlp.c_fc.weight", 0, float("nan"))
    before = snapshot(tmp_path)
    extra = {
        "tools/export_hf.py": [f"--hf_dir={tmp_path / 'hf'}"],
        "tools/evaluate.py": ["--text=abcabc", "--device=cpu"],
        "tools/attention.py": ["--start=abc", f"--png={tmp_path / 'attn.png'}"],
        "sample.py": ["--device=cpu"],
    }
    result = run(script, f"--out_dir={out}", *extra[script])
    assert_user_error(result, "non-finite weights", "transformer.h.0.mlp.c_fc.weight")
    assert snapshot(tmp_path) == before
