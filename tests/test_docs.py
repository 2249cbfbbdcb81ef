"""The documentation is part of the product: its links resolve inside the repository, the code
cites sections that exist, and every code block of README.md and docs/*.md runs as written.

What is checked (no network, nothing outside the repository):

- Links. In every Markdown file of the repository (tracked, or new and not ignored by git):
  every relative target of ``[text](target)``, ``![alt](target)`` and ``[label]: target`` exists
  inside the repository, and a ``#anchor`` names a heading of its Markdown target (GitHub's
  heading slugs). http(s) and mailto targets are skipped. A bracketed file name that is no link
  (``[docs/CLI.md]`` without a target or a reference definition) is an error.
- No file of the repository contains the path of the out-of-repository documentation the code
  once pointed at.
- Citations. docs/METHOD.md has the numbered sections 1-11 in order; every "METHOD.md section N"
  (also "sections N-M", "s. N", "§N", "METHOD.md N-M") in the repository names one of them; every
  ``X.md "Title"`` names a heading of docs/X.md (a prefix of it).
- ```python blocks of README.md and docs/*.md: each runs with ``exec`` in a fresh namespace, in
  a fresh temporary working directory. A block that reads a run directory made by an
  ``analyze.py ... --output DIR`` command shown earlier in the same file gets that command run
  first, exactly as shown, in the same directory (through ``analyze.main``).
- Command lines in the other code blocks of README.md and docs/*.md (continuation lines joined,
  ``#`` comments dropped):
  - ``python ... analyze.py ...`` and ``python ... train.py ...`` commands are parsed, not run
    (their paths, such as /path/to/folder, are placeholders). A complete command goes through
    the script's own parser: analyze.py's ``build_parser`` (``build_statistics_parser`` for
    contrast-stats, correlation, lda and report), train.py's LightningCLI with
    ``--print_config`` appended, which parses and validates the whole configuration (the data
    class given with ``--data`` included) and exits without training. Optional parts written as
    ``[--option value]`` are parsed as if given.
  - A synopsis line that cannot be parsed (placeholders such as METHOD, alternatives ``a|b``,
    ``[options]``) must name only options that the parser of every method it stands for has.
  - ``make TARGET`` names a target of the Makefile. (``make demo`` itself trains for minutes
    and is not run here; tests/test_train.py runs train.py end to end on a short config.)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from sensitivity.augmentations import AUGMENTATIONS, unregister_augmentation

ROOT = Path(__file__).resolve().parent.parent
# Spelled in two parts so that this file does not contain it.
OLD_DOCS = "shared" + "/docs"
_SKIPPED_DIRS = {".git", ".venv", "runs", "wandb", "__pycache__", ".ruff_cache", ".pytest_cache"}


def repository_files() -> list[Path]:
    """Tracked files and new files git does not ignore: what a commit of the checkout holds."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode()
        files = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
            files += [Path(folder) / name for name in names]
    return sorted(p for p in files if p.is_file())


FILES = repository_files()
MARKDOWN = [p for p in FILES if p.suffix == ".md"]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------ Markdown parsing
@dataclass
class Block:
    """A fenced code block: its file, the line of its opening fence, its language and text."""

    path: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"


_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def parse_markdown(path: Path) -> tuple[list[Block], list[str]]:
    """(fenced code blocks, the file's lines with code blocks blanked out)."""
    blocks: list[Block] = []
    prose: list[str] = []
    fence, start, lang, body = None, 0, "", []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, start, lang, body = match.group(1), number, match.group(2).lower(), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence) and not line.strip(fence[0]):
            blocks.append(Block(path, start, lang, "\n".join(body) + "\n"))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"{rel(path)}:{start}: code block never closed"
    return blocks, prose


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(path: Path) -> list[str]:
    _, prose = parse_markdown(path)
    return [m.group(2).strip() for line in prose if (m := re.match(r"^(#{1,6})\s+(.*?)#*$", line))]


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        base = slug(heading)
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


_INLINE_CODE = re.compile(r"(`+).+?\1")
_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_DEFINITION = re.compile(r"^\s{0,3}\[([^\]]+)\]:\s*<?(\S+?)>?(?:\s.*)?$")
_BARE = re.compile(r"\[([^\[\]]+)\](?![(\[:])")
_FILE_NAME = re.compile(r"^[\w./-]*[\w-]\.[A-Za-z]\w*$")


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and reference definition outside code."""
    _, prose = parse_markdown(path)
    out = []
    for number, line in enumerate(prose, 1):
        line = _INLINE_CODE.sub("", line)
        out += [(number, m.group(2)) for m in _LINK.finditer(line)]
        if m := _DEFINITION.match(line):
            out.append((number, m.group(2)))
    return out


def check_target(path: Path, number: int, target: str) -> str | None:
    """Why the link is broken, or None."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
        return None
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
    where = f"{rel(path)}:{number}: {target!r}"
    if not resolved.is_relative_to(ROOT):
        return f"{where} points outside the repository"
    if not resolved.exists():
        return f"{where} does not exist"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{where}: no heading with anchor #{anchor} in {rel(resolved)}"
    return None


# ------------------------------------------------------------------------------ links, citations
def test_the_documentation_files_are_found():
    assert ROOT / "README.md" in MARKDOWN
    for name in ("METHOD.md", "ARCHITECTURE.md", "CLI.md", "RESULTS_FORMAT.md", "PERFORMANCE.md"):
        assert ROOT / "docs" / name in DOCS


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_relative_links_resolve_inside_the_repository(path):
    found = links(path)
    broken = [why for number, target in found if (why := check_target(path, number, target))]
    assert not broken, "\n".join(broken)
    defined = {m.group(1).lower() for line in parse_markdown(path)[1]
               if (m := _DEFINITION.match(line))}
    bare = [
        f"{rel(path)}:{number}: [{m.group(1)}] is no link (give it a target)"
        for number, line in enumerate(parse_markdown(path)[1], 1)
        for m in _BARE.finditer(_INLINE_CODE.sub("", _LINK.sub("", line)))
        if _FILE_NAME.match(m.group(1)) and m.group(1).lower() not in defined
    ]
    assert not bare, "\n".join(bare)


def test_link_checker_catches_what_it_should(tmp_path):
    """The checks above fail on broken links (so their passing means something)."""
    page = ROOT / "docs" / "CLI.md"
    assert check_target(page, 1, "METHOD.md") is None
    assert check_target(page, 1, "METHOD.md#5-sobol-indices") is None
    assert check_target(page, 1, "#what-the-numbers-mean-and-when-to-trust-them") is None
    assert "does not exist" in check_target(page, 1, "NOPE.md")
    assert "outside the repository" in check_target(page, 1, "../../" + OLD_DOCS + "/METHOD.md")
    assert "no heading" in check_target(page, 1, "METHOD.md#no-such-section")
    assert check_target(page, 1, "https://example.org/x.md") is None
    assert slug("W&B") == "wb" and slug("4. Outputs Y") == "4-outputs-y"
    assert _FILE_NAME.match("docs/CLI.md") and not _FILE_NAME.match("0, 1")
    assert not _FILE_NAME.match("0.5")


def test_no_file_points_at_the_old_documentation_folder():
    offending = []
    for path in FILES:
        if not path.is_file():  # removed since collection
            continue
        data = path.read_bytes()
        if b"\0" not in data[:8192] and OLD_DOCS.encode() in data:
            offending.append(rel(path))
    assert not offending, f"these files mention {OLD_DOCS}: {offending}"


def test_method_has_the_numbered_sections_the_code_cites():
    method = ROOT / "docs" / "METHOD.md"
    numbered = [int(m.group(1)) for h in headings(method) if (m := re.match(r"(\d+)\. ", h))]
    assert numbered == list(range(1, 12))
    pattern = re.compile(
        r"METHOD\.md(?:'s)?,?\s*(?:sections?\s+|s\.\s*|§\s*)?"
        r"(\d+(?:\s*(?:-|,|and)\s*\d+)*)(?!\.\d)"
    )
    cited = []
    for path in FILES:
        if path.suffix not in (".py", ".md", ".yaml", ".sh", ".toml", "") or not path.is_file():
            continue
        for m in pattern.finditer(path.read_text(encoding="utf-8", errors="replace")):
            numbers = [int(n) for n in re.findall(r"\d+", m.group(1))]
            cited.append((rel(path), m.group(0), numbers))
    assert len(cited) > 20, "the citation pattern no longer finds the code's citations"
    wrong = [f"{p}: {text!r}" for p, text, numbers in cited if not set(numbers) <= set(numbered)]
    assert not wrong, "citations of sections METHOD.md does not have:\n" + "\n".join(wrong)


def test_quoted_section_titles_exist():
    """``CLI.md "W&B"``, ``ARCHITECTURE.md "Results file"``...: the heading exists."""
    pattern = re.compile(r"\b([A-Z][A-Z_]+)\.md,?\s+\"([^\"]+)\"")
    missing, count = [], 0
    for path in FILES:
        if path.suffix not in (".py", ".md", ".yaml") or not path.is_file():
            continue
        for m in pattern.finditer(path.read_text(encoding="utf-8", errors="replace")):
            name, title = m.group(1), " ".join(m.group(2).split())
            target = ROOT / "README.md" if name == "README" else ROOT / "docs" / f"{name}.md"
            count += 1
            if not target.exists() or not any(h.startswith(title) for h in headings(target)):
                missing.append(f"{rel(path)}: {name}.md {title!r}")
    assert count >= 5
    assert not missing, "\n".join(missing)


# ------------------------------------------------------------------------------ command lines
_SCRIPT = re.compile(r"(?:^|\s)(?:\S*/)?python[\d.]*\s+(?:\S*/)?(analyze|train)\.py(?=\s|$)(.*)$")
_MAKE = re.compile(r"^\s*make\s+([\w-]+)")


@dataclass
class Command:
    where: str
    script: str  # "analyze" | "train" | "make"
    raw: str  # the arguments as written

    @property
    def tokens(self) -> list[str]:
        return shlex.split(_unquoted_brackets_removed(self.raw), comments=True)


def command_lines(block: Block) -> list[Command]:
    """The commands of a (non-python) code block, continuation lines joined."""
    lines, out = block.text.splitlines(), []
    joined: list[tuple[int, str]] = []
    for offset, line in enumerate(lines, 1):
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
        else:
            joined.append((offset, line))
    for offset, line in joined:
        where = f"{rel(block.path)}:{block.line + offset}"
        if m := _SCRIPT.search(line):
            out.append(Command(where, m.group(1), m.group(2)))
        elif m := _MAKE.match(line):
            out.append(Command(where, "make", m.group(1)))
    return out


def _unquoted(raw: str) -> list[tuple[str, bool]]:
    """(character, inside quotes) for every character of ``raw`` up to an unquoted comment."""
    out, quote = [], None
    for i, char in enumerate(raw):
        if quote is None and char == "#" and (i == 0 or raw[i - 1].isspace()):
            break
        if quote is None and char in "\"'":
            quote = char
        elif quote == char:
            quote = None
        out.append((char, quote is not None or char in "\"'"))
    return out


def _unquoted_brackets_removed(raw: str) -> str:
    return "".join(c for c, quoted in _unquoted(raw) if quoted or c not in "[]")


# METHOD, NAME, DIR: a word in capitals stands for a value (ST, S1 or IMAGENET1K_V1 are values).
_PLACEHOLDER = re.compile(r"[A-Z]{3,}")


def is_synopsis(command: Command) -> bool:
    """Placeholders (METHOD), alternatives (a|b) or optional parts other than ``[--opt ...]``."""
    chars = _unquoted(command.raw)
    for i, (char, quoted) in enumerate(chars):
        if quoted:
            continue
        if char == "|":
            return True
        if char == "[" and (i + 1 >= len(chars) or chars[i + 1][0] != "-"):
            return True
    return any(_PLACEHOLDER.fullmatch(token) for token in command.tokens)


def _quiet(function, *args):
    """Run ``function(*args)`` with its output captured: (exit status, output, return value).

    The status is an int the function returns (a CLI's ``main``), a SystemExit's code, else 0.
    """
    out = io.StringIO()
    value = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            value = function(*args)
            status = value if isinstance(value, int) and not isinstance(value, bool) else 0
        except SystemExit as exit_:
            code = exit_.code
            status = code if isinstance(code, int) else (0 if code is None else 1)
    return status, out.getvalue(), value


def _analyze_parser(method: str):
    import analyze

    if method in analyze.STATISTICS:
        return analyze.build_statistics_parser(method)
    if method == "suppress":
        return analyze.build_suppress_parser()
    return analyze.build_parser()


def _analyze_methods(token: str | None) -> list[str]:
    """The methods a method token stands for: itself, a|b, or a placeholder."""
    import analyze

    if token is None:
        return ["sobol"]  # the embedded demo's method
    methods = []
    for part in token.split("|"):
        if part == "METHOD":
            methods += list(analyze.METHODS)
        elif part == "STATISTIC":
            methods += list(analyze.STATISTICS)
        else:
            assert not _PLACEHOLDER.fullmatch(part), f"unknown method placeholder {part!r}"
            methods.append(part)
    return methods


def _train(args: list[str]) -> tuple[int, str]:
    """train.py's CLI on ``args`` in this process, its output captured: (status, output)."""
    import train

    # LightningCLI warns when sys.argv holds arguments too (pytest's own, here).
    with mock.patch.object(sys, "argv", ["train.py"]):
        status, text, _ = _quiet(train.main, args)
    return status, text


def _train_help_options(args: list[str]) -> set[str]:
    status, text = _train(args)
    assert status == 0, text
    return set(re.findall(r"--[\w.-]+", text))


def check_analyze(command: Command) -> None:
    import analyze

    tokens = command.tokens
    if is_synopsis(command):
        if "--method" in tokens:
            token = tokens[tokens.index("--method") + 1]
        else:
            token = tokens[0] if tokens and not tokens[0].startswith("-") else None
        options = [t.split("=")[0] for t in tokens if t.startswith("--")]
        for method in _analyze_methods(token):
            known = set(_analyze_parser(method)._option_string_actions)
            unknown = [o for o in options if o not in known]
            assert not unknown, f"{command.where}: analyze.py {method} has no options {unknown}"
        return
    args = analyze.normalise_args(tokens)
    method = analyze.requested_method(args)
    parser = _analyze_parser(method)
    status, text, cfg = _quiet(parser.parse_args, args)
    assert status == 0, f"{command.where}: analyze.py {command.raw.strip()}\n{text[-1500:]}"
    if cfg is not None and method not in analyze.STATISTICS:  # None: --help
        assert cfg.method in (*analyze.METHODS, *analyze.MASKING_METHODS, "suppress"), command.where


def check_train(command: Command) -> None:
    tokens = command.tokens
    if is_synopsis(command):
        options = {t.split("=")[0] for t in tokens if t.startswith("--")}
        known = _train_help_options(["fit", "--help"])
        if "--data" in tokens:
            data_class = tokens[tokens.index("--data") + 1]
            known |= _train_help_options(["fit", "--data.help", data_class])
        assert options <= known, f"{command.where}: train.py has no options {options - known}"
        return
    status, text = _train([*tokens, "--print_config"])
    assert status == 0, f"{command.where}: train.py {command.raw.strip()}\n{text[-1500:]}"
    assert "model:" in text and "trainer:" in text, text


def check_make(command: Command) -> None:
    targets = re.findall(r"^([\w-]+)\s*:", (ROOT / "Makefile").read_text(), flags=re.M)
    assert command.raw in targets, f"{command.where}: no make target {command.raw!r}"


COMMANDS = [
    command
    for path in DOCS
    for block in parse_markdown(path)[0]
    if block.lang != "python"
    for command in command_lines(block)
]


def test_the_documented_commands_are_found():
    scripts = {c.script for c in COMMANDS}
    assert scripts == {"analyze", "train", "make"}, scripts
    assert sum(not is_synopsis(c) for c in COMMANDS if c.script == "analyze") >= 8


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where}:{c.script}")
def test_documented_command_lines_parse(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a parser might write lands in the checkout
    {"analyze": check_analyze, "train": check_train, "make": check_make}[command.script](command)


def test_command_checks_reject_wrong_commands(tmp_path, monkeypatch):
    """A misspelled option or a bad value fails the checks above."""
    monkeypatch.chdir(tmp_path)
    bad = [
        Command("x", "analyze", "sobol --n_base 32"),
        Command("x", "analyze", "sobol --n many"),
        Command("x", "analyze", "--config no_such_preset"),
        Command("x", "analyze", "METHOD --n_base 32"),
        Command("x", "analyze", "lda --results R.h5 --alpha 0.05"),
        Command("x", "train", "fit --model.archx resnet18"),
        Command("x", "train", "fit --model.archx NAME"),
        Command("x", "make", "deploy"),
    ]
    check = {"analyze": check_analyze, "train": check_train, "make": check_make}
    for command in bad:
        with pytest.raises(AssertionError):
            check[command.script](command)
    check_train(Command("x", "train", "fit --model.arch NAME"))
    check_analyze(Command("x", "analyze", 'sobol --n 32 [--layers "[layer1, fc]"]'))
    assert not is_synopsis(Command("x", "analyze", 'sobol [--layers "[layer1, fc]"]'))
    assert is_synopsis(Command("x", "analyze", "masking|single-class --results R.h5"))
    assert is_synopsis(Command("x", "analyze", "sobol [options]"))


# ------------------------------------------------------------------------------ python blocks
PYTHON_BLOCKS = [b for path in DOCS for b in parse_markdown(path)[0] if b.lang == "python"]


def setup_commands(block: Block) -> list[Command]:
    """The ``analyze.py ... --output DIR`` commands shown before ``block`` in its file whose
    run directory the block reads."""
    out = []
    for earlier in parse_markdown(block.path)[0]:
        if earlier.line >= block.line or earlier.lang == "python":
            continue
        for command in command_lines(earlier):
            tokens = command.tokens if command.script == "analyze" else []
            if "--output" in tokens:
                output = tokens[tokens.index("--output") + 1].rstrip("/")
                if f"{output}/" in block.text or f'"{output}"' in block.text:
                    out.append(command)
    return out


def test_python_blocks_are_found():
    assert {b.path.name for b in PYTHON_BLOCKS} >= {"README.md", "ARCHITECTURE.md",
                                                    "RESULTS_FORMAT.md"}


@pytest.mark.parametrize(
    "block",
    # a block whose setup runs an analysis is slow (a network forward of every design row)
    [pytest.param(b, marks=[pytest.mark.slow] if setup_commands(b) else []) for b in PYTHON_BLOCKS],
    ids=lambda b: b.where,
)
def test_python_blocks_run_as_written(block, tmp_path, monkeypatch):
    import analyze

    monkeypatch.chdir(tmp_path)
    for command in setup_commands(block):
        status, text, _ = _quiet(analyze.main, command.tokens)
        assert status == 0, f"{command.where}: analyze.py {command.raw.strip()}\n{text[-1500:]}"
    code = compile(block.text, block.where, "exec")
    known = set(AUGMENTATIONS)
    try:
        exec(code, {"__name__": "__doc_block__"})
    finally:  # a block may register an augmentation: the registry is global
        for name in set(AUGMENTATIONS) - known:
            unregister_augmentation(name)
