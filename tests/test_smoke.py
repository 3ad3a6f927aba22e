"""End to end through main(argv): prepare -> train -> resume -> sample, all in-process on CPU."""

import os

from conftest import TINY_TRAIN

import sample
import train

TINY = [*TINY_TRAIN, "--log_interval=5", "--dropout=0.1"]


def test_prepare_train_resume_sample(char_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = [f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", *TINY]
    train.main([*common, "--max_iters=20", "--eval_interval=10"])
    assert sorted(os.listdir(out)) == [
        "ckpt-0000010",
        "ckpt-0000020",
        "loss_curve.png",
        "metrics.jsonl",
        "train_config.py",
    ]
    train.main([*common, "--max_iters=30", "--eval_interval=10", "--init_from=resume"])
    text = capsys.readouterr().out
    assert "resuming from" in text and "step 30:" in text
    sample.main([f"--out_dir={out}", "--device=cpu", "--num_samples=2", "--max_new_tokens=20", "--start=ROMEO:"])
    samples = capsys.readouterr().out.split("---------------\n")
    assert len(samples) == 3 and all(s.startswith("ROMEO:") for s in samples[:2])
