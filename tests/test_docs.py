"""The README and docs/ tell the truth: each command in them runs a script of ours that exists, with options that
script accepts; each path of ours they name exists; each link resolves; and the README stays an entry point that
links every guide in docs/.

    python -m pytest -q tests/test_docs.py

A command is a fenced code block line (continuation lines joined; several commands joined by `&&`, `|` or `;`) or an
inline code span that runs `python <script>.py ...` or `torchrun ... <script>.py ...` (an inline span may also start at
the script: `sample.py --chat=True`). The options a script accepts are the `  --name=default` lines its own `--help`
prints (engine/configurator.describe_fields), plus the flags engine/configurator.py itself handles (`--help`).
"""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = "README.md"
MAX_README_LINES = 260  # an entry point: what it is, run it, test it, usage essentials, the files in reading order
# Scripts that take train.py's command line besides their own options: their --help lists their own and says so.
TAKES_TRAIN_OPTIONS = {"tools/sizing.py", "tools/plan.py", "bench/train_speed.py"}
# Paths of ours: what a command or a sentence names under these folders must exist (data/, out*/ and the other
# folders a command creates are never under them).
OUR_PATH = re.compile(r"(?<![\w./<>-])((?:config|engine|tools|prepare|bench|docs|tests)/[\w.*-]+(?:/[\w.*-]+)*/?)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SEPARATORS = {"&&", "||", "|", ";"}


def doc_files() -> list[str]:
    """README.md and every docs/*.md, relative to the repository root."""
    return [README] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(rel: str) -> list[str]:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read().split("\n")


def fenced_and_prose(lines: list[str]) -> tuple[list[tuple[int, str]], str]:
    """(line number, logical line) for every line of the fenced code blocks, continuation lines joined; and the prose,
    with the fenced lines blanked so that offsets still give line numbers."""
    fenced, prose, inside, pending = [], [], False, None
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            prose.append("")
            continue
        if not inside:
            prose.append(line)
            continue
        prose.append("")
        start, text = pending if pending else (number, "")
        text += line
        if line.endswith("\\"):
            pending = (start, text[:-1] + " ")
        else:
            pending = None
            fenced.append((start, text))
    return fenced, "\n".join(prose)


def inline_spans(prose: str) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span; a span may run over a line break."""
    return [
        (prose.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")) for m in re.finditer(r"`([^`]+)`", prose)
    ]


def script_call(tokens: list[str], inline: bool) -> tuple[str, list[str]] | None:
    """(script, the arguments after it) when these tokens run one of our scripts, else None."""
    for i, token in enumerate(tokens):
        name = os.path.basename(token)
        if name in ("python", "python3"):
            if i + 1 < len(tokens) and tokens[i + 1].endswith(".py") and not tokens[i + 1].startswith("-"):
                return tokens[i + 1], tokens[i + 2 :]
            return None  # python -c, python -m, a bare python
        if name == "torchrun":
            for j in range(i + 1, len(tokens)):
                if not tokens[j].startswith("-"):  # torchrun's own options come first, written --key=value
                    return (tokens[j], tokens[j + 1 :]) if tokens[j].endswith(".py") else None
            return None
    first = tokens[0] if tokens else ""
    if inline and first.endswith(".py") and not first.startswith("config/") and any(t.startswith("--") for t in tokens):
        return first, tokens[1:]
    return None


def commands() -> list[tuple[str, int, str, list[str]]]:
    """(file, line, script, arguments) for every command in README.md and docs/*.md that runs one of our scripts."""
    found = []
    for rel in doc_files():
        fenced, prose = fenced_and_prose(read(rel))
        for inline, units in ((False, fenced), (True, inline_spans(prose))):
            for number, text in units:
                try:
                    tokens = shlex.split(text, comments=not inline)
                except ValueError as e:  # unbalanced quotes: the command cannot be run as written
                    found.append((rel, number, "", [f"<{e}>"]))
                    continue
                segment: list[str] = []
                for token in tokens + [";"]:
                    if token not in SEPARATORS:
                        segment.append(token)
                        continue
                    call = script_call(segment, inline)
                    if call:
                        found.append((rel, number, *call))
                    segment = []
    return found


def option_names(help_text: str) -> set[str]:
    return set(re.findall(r"^\s+--(\w+)=", help_text, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def accepted_options() -> dict[str, set[str] | str]:
    """Script -> the option names its --help lists (or the output of a --help that failed), every script's --help
    run once, all at the same time."""
    scripts = {script for _, _, script, _ in commands() if os.path.isfile(os.path.join(ROOT, script))}
    if scripts & TAKES_TRAIN_OPTIONS:
        scripts.add("train.py")
    running = {
        s: subprocess.Popen(
            [sys.executable, s, "--help"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for s in sorted(scripts)
    }
    options: dict[str, set[str] | str] = {}
    for script, process in running.items():
        out, _ = process.communicate(timeout=600)
        options[script] = option_names(out) if process.returncode == 0 else out[-2000:]
    with open(os.path.join(ROOT, "engine", "configurator.py"), encoding="utf-8") as f:
        generic = set(re.findall(r"\"--(\w+)\"", f.read())) | {"h"}  # handled before any field: --help, ...
    for script, names in options.items():
        if isinstance(names, set):
            names |= generic
            if script in TAKES_TRAIN_OPTIONS and isinstance(options.get("train.py"), set):
                names |= options["train.py"]
    return options


def test_commands_run_scripts_that_exist():
    assert commands(), "no commands found in README.md: the parser is broken"
    missing = [
        f"{rel}:{line}: {script or ' '.join(args)}: no such script"
        for rel, line, script, args in commands()
        if not script or not os.path.isfile(os.path.join(ROOT, script))
    ]
    assert not missing, "\n" + "\n".join(missing)


def test_command_options_are_options_the_script_accepts(accepted_options):
    wrong = [f"{script} --help failed:\n{out}" for script, out in accepted_options.items() if isinstance(out, str)]
    for rel, line, script, args in commands():
        accepted = accepted_options.get(script)
        if not isinstance(accepted, set):
            continue  # no such script (test_commands_run_scripts_that_exist names it), or its --help failed
        for arg in args:
            if arg.startswith("-") and arg not in ("-", "--"):
                key = arg.lstrip("-").partition("=")[0].replace("-", "_")
                if key not in accepted:
                    wrong.append(f"{rel}:{line}: {script} has no option {arg.partition('=')[0]}")
    assert not wrong, "\n" + "\n".join(wrong)


def test_preset_files_named_in_commands_exist():
    missing = [
        f"{rel}:{line}: {script}: preset {arg} does not exist"
        for rel, line, script, args in commands()
        for arg in args
        if arg.endswith(".py") and not arg.startswith("-") and not glob.glob(os.path.join(ROOT, arg))
    ]
    assert not missing, "\n" + "\n".join(missing)


def test_paths_of_ours_exist():
    missing = []
    for rel in doc_files():
        fenced, prose = fenced_and_prose(read(rel))
        for number, text in fenced + inline_spans(prose):
            for path in OUR_PATH.findall(text):
                if not glob.glob(os.path.join(ROOT, path)):
                    missing.append(f"{rel}:{number}: {path} does not exist")
    assert not missing, "\n" + "\n".join(missing)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    broken = []
    for rel in doc_files():
        for number, line in enumerate(read(rel), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # https:, mailto:
                path, _, anchor = target.partition("#")
                full = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), path)) if path else None
                if full and not os.path.exists(full):
                    broken.append(f"{rel}:{number}: link {target} does not resolve")
                    continue
                linked = os.path.relpath(full, ROOT) if full else rel
                if anchor and linked.endswith(".md"):
                    headings = {slug(h.lstrip("#")) for h in read(linked) if re.match(r"#+ ", h)}
                    if anchor not in headings:
                        broken.append(f"{rel}:{number}: link {target}: no heading #{anchor} in {linked}")
    assert not broken, "\n" + "\n".join(broken)


def test_readme_is_an_entry_point_that_links_every_guide():
    lines = read(README)
    assert len(lines) - 1 <= MAX_README_LINES, f"README.md: {len(lines) - 1} lines; move long sections into docs/"
    head = "\n".join(lines[:30])
    assert "**Run it**" in head and "pip install -r requirements-dev.txt && python -m pytest" in head, (
        "README.md: the Run it and Test it commands must stay at the top"
    )
    text = "\n".join(lines)
    unlinked = [rel for rel in doc_files()[1:] if f"]({rel})" not in text and f"]({rel}#" not in text]
    assert not unlinked, "README.md does not link " + ", ".join(unlinked)
