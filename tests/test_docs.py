"""Every fenced block in README.md and docs/*.md is checked by its language tag, so a user who copies
one gets no unknown-key error, no syntax error and no unknown option:

    toml                  loads as a fleet config (with [collector]) or an agent config (a fragment is
                          completed with the keys it lacks)
    json                  parses
    python                compiles; every `from agent… / cloud… import X` resolves
    bash, sh, console     `bash -n` accepts it; every `agent` / `fleet` command line is accepted by the
                          project's own argument parser; a `scripts/…` (or `.ci/…`) program exists, and
                          its --options appear in its source
    ini                   parses (systemd style: repeated keys allowed)
    text                  not code (pictures, grammars, trees): not checked

A block without a tag fails. Relative links between the pages must point at a file and a heading
that exist."""

from __future__ import annotations

import ast
import configparser
import contextlib
import importlib
import io
import json
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import config
from agent.cli import _parser as agent_parser
from agent.errors import AgentError
from cloud import config as fleet_config
from cloud.cli import _parser as fleet_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TAGS = frozenset({"toml", "json", "python", "bash", "sh", "console", "text", "ini"})
MINIMAL = 'channel = "walk"\nstate_dir = "/tmp/s"\nsocket = "/tmp/r/infer.sock"\n'
PARSERS = {"agent": agent_parser, "fleet": fleet_parser}
PYTHONS = frozenset({"python", "python3", ".venv/bin/python", ".venv/bin/python3"})
REPO_PROGRAM = re.compile(r"^(scripts|\.ci)/[\w.-]+$")
PASS_THROUGH = frozenset({"scripts/test"})  # its arguments go to pytest
CONTROL = frozenset({"&&", "||", ";", "&"})
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
REDIRECTION = re.compile(r"^(&?>>?|<|>&|<&)$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository
    index: int  # the block's position in its page, from 0
    line: int  # the line of its opening fence, from 1
    tag: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.index}:{self.tag or 'untagged'}"


def fenced_blocks(page: str, markdown: str) -> list[Block]:
    blocks: list[Block] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^ {0,3}```(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        info = opening.group(1).strip()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{page}:{i + 1}: a fenced block is never closed"
        tag = info.split()[0] if info else ""
        blocks.append(Block(page, len(blocks), i + 1, tag, "".join(x + "\n" for x in lines[i + 1 : end])))
        i = end + 1
    return blocks


BLOCKS = [b for p in PAGES for b in fenced_blocks(str(p.relative_to(ROOT)), p.read_text())]


# -- the checks, one per tag ---------------------------------------------------------------------


def check_toml(block: Block, tmp_path: Path) -> None:
    p = tmp_path / "example.toml"
    if "[collector]" in block.text:
        p.write_text(block.text)
        fleet_config.load(p)
        return
    # A fragment of an agent config: complete it with the required keys the fragment lacks.
    needed = "".join(line + "\n" for line in MINIMAL.splitlines() if line.split(" =")[0] + " =" not in block.text)
    p.write_text(needed + block.text)
    config.load(p)


def check_json(block: Block, tmp_path: Path) -> None:
    json.loads(block.text)


def check_python(block: Block, tmp_path: Path) -> None:
    tree = ast.parse(compile(block.text, block.name, "exec", flags=ast.PyCF_ONLY_AST))
    compile(block.text, block.name, "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _ours(node.module or ""):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert alias.name == "*" or _has(module, alias.name), (
                    f"{block.name}: `from {node.module} import {alias.name}`: no such name"
                )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    importlib.import_module(alias.name)


def _ours(module: str) -> bool:
    return module.partition(".")[0] in {"agent", "cloud"}


def _has(module: object, name: str) -> bool:
    if hasattr(module, name):
        return True
    try:  # a submodule not imported by its package: `from agent import client`
        importlib.import_module(f"{getattr(module, '__name__', '')}.{name}")
    except ImportError:
        return False
    return True


def check_shell(block: Block, tmp_path: Path) -> None:
    script = shell_script(block)
    done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{block.name}: bash -n: {done.stderr.strip()}"
    for argv in commands(block):
        check_command(block, argv)


def check_ini(block: Block, tmp_path: Path) -> None:
    configparser.ConfigParser(strict=False, interpolation=None).read_string(block.text, source=block.name)


def check_nothing(block: Block, tmp_path: Path) -> None:
    """Not code: a picture, a grammar, a tree."""


CHECKS: dict[str, Callable[[Block, Path], None]] = {
    "toml": check_toml,
    "json": check_json,
    "python": check_python,
    "bash": check_shell,
    "sh": check_shell,
    "console": check_shell,
    "ini": check_ini,
    "text": check_nothing,
}
assert set(CHECKS) == TAGS


# -- shell blocks --------------------------------------------------------------------------------


def shell_script(block: Block) -> str:
    """The block as bash reads it; in a `console` block only the `$ ` prompt lines are commands."""
    if block.tag != "console":
        return block.text
    out: list[str] = []
    continued = False
    for line in block.text.splitlines():
        if line.startswith("$ ") or continued:
            out.append(line[2:] if line.startswith("$ ") and not continued else line)
            continued = line.rstrip().endswith("\\")
    return "".join(x + "\n" for x in out)


def logical_lines(script: str) -> list[str]:
    """Lines with their `\\` continuations joined."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def commands(block: Block) -> list[list[str]]:
    """Each simple command of the block as argv (leading `sudo` and `VAR=value` removed, comments and
    `&` dropped; `&&`, `||` and `;` separate commands). Lines with a pipe or a command substitution
    are left out: their words are not the command's."""
    found: list[list[str]] = []
    for line in logical_lines(shell_script(block)):
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = without_redirections(list(lex))  # comments dropped
        if {"|", "(", ")"} & set(tokens) or any("$(" in t or "`" in t for t in tokens):
            continue
        argv: list[str] = []
        for token in [*tokens, ";"]:
            if token not in CONTROL:
                argv.append(token)
                continue
            while argv and (argv[0] == "sudo" or ENV_ASSIGNMENT.match(argv[0])):
                argv = argv[1:]
            if argv:
                found.append(argv)
            argv = []
    return found


def without_redirections(tokens: list[str]) -> list[str]:
    """`> out`, `2>&1`, `< in` removed: they are the shell's, not the command's."""
    out: list[str] = []
    skip = False
    for token in tokens:
        if skip:
            skip = False
        elif REDIRECTION.match(token):
            if out and out[-1].isdigit():  # the fd of `2>` (shlex splits it off)
                out.pop()
            skip = True
        else:
            out.append(token)
    return out


def check_command(block: Block, argv: list[str]) -> None:
    program, args = argv[0], argv[1:]
    if program in PARSERS:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                PARSERS[program]().parse_args(args)
        except SystemExit as exit_:
            # --help and --version exit 0 by design; anything else is a usage error.
            assert exit_.code == 0, f"{block.name}: `{shlex.join(argv)}`: {err.getvalue().strip()}"
        return
    if program in PYTHONS and args and REPO_PROGRAM.match(args[0]):
        program, args = args[0], args[1:]
    if REPO_PROGRAM.match(program):
        path = ROOT / program
        assert path.is_file(), f"{block.name}: `{shlex.join(argv)}`: {program} does not exist"
        if program in PASS_THROUGH:
            return
        sources = [path, path.with_suffix(".py")]
        source = "".join(p.read_text() for p in sources if p.is_file())
        for module in re.findall(r"^from (agent[\w.]*) import main$", source, flags=re.M):  # a thin wrapper
            source += (ROOT / (module.replace(".", "/") + ".py")).read_text()
        for option in (a.split("=")[0] for a in args if a.startswith("--")):
            assert option in source, f"{block.name}: `{shlex.join(argv)}`: {program} has no {option}"


def cli_commands() -> list[tuple[Block, list[str]]]:
    return [(b, argv) for b in BLOCKS if CHECKS.get(b.tag) is check_shell for argv in commands(b)]


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_fenced_block(block: Block, tmp_path: Path) -> None:
    assert block.tag, f"{block.name} (line {block.line}): tag the block (```text for a picture or a grammar)"
    assert block.tag in TAGS, f"{block.name} (line {block.line}): unknown tag {block.tag!r}; use one of {sorted(TAGS)}"
    CHECKS[block.tag](block, tmp_path)


def test_blocks_of_every_main_kind_are_checked() -> None:
    tags = [b.tag for b in BLOCKS]
    assert tags.count("toml") >= 4
    assert {"json", "python", "bash", "sh", "text"} <= set(tags)


def test_command_lines_are_checked() -> None:
    """The parser check runs on real lines, not on none."""
    checked = [argv for _, argv in cli_commands() if argv[0] in PARSERS]
    assert len(checked) > 10
    assert {argv[0] for argv in checked} == {"agent", "fleet"}
    assert any(REPO_PROGRAM.match(argv[0]) for _, argv in cli_commands())


def test_readme_stays_short_and_links_every_page() -> None:
    readme = (ROOT / "README.md").read_text()
    # The two commands, the students' commands, the Jetson check, the Go2, what survives what; the rest
    # is in docs/ (it was 45 KB once).
    assert len(readme.encode()) < 12_000  # issue 13: README under 12 KB
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(markdown: str) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^ {0,3}```.*?^ {0,3}```[ \t]*$", "", markdown, flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", _prose(page.read_text()))):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", _prose(path.read_text()), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: link to {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_repository_paths_exist(page: Path) -> None:
    """A path into this repository quoted in the prose (`agent/engines/build.py`) is not stale."""
    for code in re.findall(r"`([^`\n]+)`", _prose(page.read_text())):
        for path in re.findall(r"(?:^|\s)((?:agent|cloud|scripts|systemd|tests|docs|\.ci)/[\w./-]*)", code):
            assert (ROOT / path).exists(), f"{page.name}: `{code}`: {path} does not exist"


@pytest.mark.parametrize(
    ("tag", "text"),
    [
        ("bash", "agent status --jsn\n"),  # no such option
        ("sh", "sudo fleet publish model.onnx  # --channel is required\n"),
        ("bash", "agent deploy m.onnx \\\n  --skip-check latency\n"),  # not a choice
        ("bash", "agent run & agent go2 armm\n"),
        ("bash", "scripts/no-such-script --flag\n"),
        ("bash", ".venv/bin/python scripts/bench_swap.py --no-such-option\n"),
        ("console", "$ agent models --limit many\n"),
        ("bash", 'if then fi "\n'),
        ("toml", "no_such_key = 1\n"),
        ("toml", "[collector]\ndb = 3\n"),
        ("json", "{'single': 'quotes'}\n"),
        ("python", "from agent.client import NoSuchThing\n"),
        ("python", "def broken(:\n"),
        ("", "an untagged picture\n"),
        ("yaml", "a: 1\n"),
    ],
)
def test_checks_catch_mistakes(tag: str, text: str, tmp_path: Path) -> None:
    with pytest.raises((AssertionError, AgentError, ValueError, SyntaxError)):
        test_fenced_block(Block("example.md", 0, 1, tag, text), tmp_path)


def test_install_template_loads_once_filled_in(tmp_path: Path) -> None:
    """systemd/agent.toml.example, as scripts/install-jetson.sh writes it."""
    template = (ROOT / "systemd" / "agent.toml.example").read_text()
    p = tmp_path / "agent.toml"
    p.write_text(template.replace("@CHANNEL@", "go2-walk").replace("@MQTT_URL@", "mqtts://broker.lab:8883"))
    cfg = config.load(p)
    assert cfg.state_dir == Path("/var/lib/edge-agent") and cfg.socket.name == "infer.sock"
