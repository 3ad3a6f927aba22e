"""Multiple-choice scoring against transformers itself: on a random-weight GPT2LMHeadModel saved to a temporary
directory (with a character tokenizer.json) and a generated task file, every per-ending log-likelihood matches the
one transformers' own logits give to 1e-4, so every chosen ending is the one they choose; HellaSwag rows are
preprocessed as lm-evaluation-harness does; bad task files are one line."""

import json
import random

import pytest
import torch

from engine.errors import UserError
from engine.tasks import Item, encode_pair, hellaswag_item, read_items, score
from engine.tokenization import char_tokenizer_json
from tools import evaluate

CHARS = " .,:abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference here")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=48, vocab_size=len(CHARS))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # sharper than the init's near-uniform logits, so the choices differ clearly
        model.lm_head.weight.mul_(20)
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    char_tokenizer_json(CHARS).save(str(directory / "tokenizer.json"))
    return str(directory)


def task_file(path, n: int = 12, seed: int = 0) -> str:
    rng = random.Random(seed)

    def words(k):
        return " ".join("".join(rng.choice(CHARS[4:]) for _ in range(rng.randint(2, 6))) for _ in range(k))

    with open(path, "w") as f:
        for i in range(n):
            # one context longer than the 48-token block, so left truncation is exercised too
            context = words(15 if i == 3 else rng.randint(1, 5)) + ("." if i % 2 else "")
            item = {"context": context, "choices": [words(rng.randint(1, 4)) for _ in range(4)], "label": i % 4}
            f.write(json.dumps(item) + "\n")
    return str(path)


def reference_scores(hf_dir, items) -> list[list[float]]:
    """Each ending's summed log-likelihood by transformers' model and tokenizer."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{hf_dir}/tokenizer.json")  # as our exports declare
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = []
    for item in items:
        row = []
        for choice in item.choices:
            ctx, cont = encode_pair(encode, item.context, " " + choice, None)
            ids = (ctx + cont)[-49:]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), dim=-1)
            row.append(sum(logp[len(ids) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont)))
        out.append(row)
    return out


def test_every_ending_scores_as_transformers_scores_it(hf_dir, tmp_path, capsys):
    from engine.inference import load_for_inference

    path = task_file(tmp_path / "task.jsonl")
    items = read_items("choice", path)
    model, tokenizer = load_for_inference(hf_dir, "unused")
    result, ours = score(model, items, tokenizer.encode, tokenizer.eot_id, batch_size=3)
    theirs = reference_scores(hf_dir, items)
    for a, b in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert max(range(4), key=a.__getitem__) == max(range(4), key=b.__getitem__)
    assert len({max(range(4), key=row.__getitem__) for row in ours}) > 1  # not one ending position always
    expected = sum(max(range(4), key=row.__getitem__) == item.label for row, item in zip(theirs, items, strict=True))
    assert result["acc"] == expected / len(items) and result["items"] == 12
    evaluate.main([f"--init_from={hf_dir}", "--task=choice", f"--task_file={path}", "--device=cpu"])
    assert f"choice: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} (12 items" in capsys.readouterr().out


def test_hellaswag_rows_are_preprocessed_as_the_harness_does():
    row = {
        "activity_label": "Making a cake",
        "ctx_a": "A woman stands in a kitchen.",
        "ctx_b": "she",
        "endings": ["pours flour [title] Mix it.", "  sings [step] loudly. "],
        "label": "1",
    }
    item = hellaswag_item(row)
    assert item == Item("Making a cake: A woman stands in a kitchen. She", ["pours flour. Mix it.", "sings loudly."], 1)


def test_the_context_space_moves_into_the_continuation():
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    assert encode_pair(encode, "ab ", " c", None) == ([97, 98], [32, 32, 99])
    assert encode_pair(encode, "", " c", 0) == ([0], [32, 99])  # an empty context is the end-of-text token


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"context": "a", "choices": ["b"], "label": 0}', "task.jsonl:1: choices: list should have at least 2 items"),
        ('{"context": "a", "choices": ["b", "c"], "label": 2}', "task.jsonl:1: label: 2 for 2 choices"),
        ("not json", "task.jsonl:1: invalid JSON"),
    ],
)
def test_a_bad_task_file_is_one_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        read_items("choice", str(path))


def test_training_scores_the_task_at_its_interval_as_evaluate_does(char_data, tmp_path, capsys):
    from test_train import args

    import train
    from engine.loss_curve import read_metrics

    path = task_file(tmp_path / "task.jsonl", n=6)
    out = tmp_path / "out"
    train.main(
        args(char_data, out, "--max_iters=6", "--eval_interval=6", "--eval_task=choice")
        + [f"--eval_task_file={path}", "--eval_task_interval=3", "--always_save_checkpoint=True"]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if "choice acc" in line]
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 3", "step 6"]
    m = read_metrics(str(out / "metrics.jsonl"))
    assert m.task == "choice" and m.task_iters == [0, 3, 6]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "task_items" in line]
    result = evaluate.main([f"--out_dir={out}", "--task=choice", f"--task_file={path}", "--device=cpu"])
    assert result["acc_norm"] == rows[-1]["choice_acc_norm"] and result["acc"] == rows[-1]["choice_acc"]
