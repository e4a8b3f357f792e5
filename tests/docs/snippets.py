"""The shell commands and Python snippets of the Markdown docs, read from the Markdown and run as written.

Every fenced block tagged ``bash``, ``sh``, ``shell`` or ``python`` is a snippet. A Python snippet whose first
line is a comment naming a ``.py`` file (``# my_ext/__init__.py``) is the code of that file: it is appended
to it, for the commands after it to use. Blocks of any other tag (or none) are quoted text (outputs, JSON,
folder trees) and are not run.

HTML comments right above a fence tell the reader, and this runner, how the block is run:

    <!-- doc-test: skip: REASON -->              not run, for the reason given (required)
    <!-- doc-test: env NAME=VALUE ... -->       extra environment variables for this block
    <!-- doc-test: ci 'OLD' -> 'NEW': REASON --> run with the text OLD replaced by NEW (e.g. fewer updates)
    <!-- doc-test: exit N -->                   the block is expected to exit with status N (an error example)
    <!-- doc-test: prints -->                   (above a quoted output) each of its lines is in the output of
                                                the block run last; numbers may differ, ``...`` lines are left out

A quoted output is compared line by line with whitespace runs as one space, ``/path/to/repo`` as the
checkout, and every number as any number, so its figures need not match digit by digit.

The snippets of one Markdown file run in order, in one scratch copy of the checkout, so a command may use
what an earlier one wrote (a checkpoint, an exported folder, a user's package).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

RUN_LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
FILE_HEADER = re.compile(r"^#\s*([\w./-]+\.py)\b")
CI_REPLACE = re.compile(r"^ci\s+'(.*?)'\s*->\s*'(.*?)'\s*:\s*(\S.*)$")

# Copied into the scratch checkout without these; the venv is linked, not copied.
NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".whl",
    ".gpu_assets",
    "output",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    "*.egg-info",
    "build",
    "dist",
)


class MarkerError(ValueError):
    """A doc-test marker that cannot be read; names the file and line."""


@dataclass
class Snippet:
    """One fenced block of a Markdown file and how it is run."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str  # the fence's tag
    code: str
    skip: Optional[str] = None  # the reason, when not run
    env: Dict[str, str] = field(default_factory=dict)
    replacements: List[tuple] = field(default_factory=list)  # (old, new)
    exit_status: int = 0
    prints: bool = False  # a quoted output of the block run before it

    @property
    def target_file(self) -> Optional[str]:
        """The file this Python snippet is the code of (its first line names it), else None."""
        if self.language != "python":
            return None
        match = FILE_HEADER.match(self.code.lstrip().splitlines()[0]) if self.code.strip() else None
        return match.group(1) if match else None

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def command(self) -> str:
        code = self.code
        for old, new in self.replacements:
            if old not in code:
                raise MarkerError(f"{self.where()}: doc-test: ci '{old}' -> ...: the block has no '{old}'")
            code = code.replace(old, new)
        return code


def _apply_marker(snippet: Snippet, text: str, where: str) -> None:
    name = re.split(r"[\s:]", text, maxsplit=1)[0]
    if name == "skip":
        reason = text[len("skip") :].lstrip(" :").strip()
        if not reason:
            raise MarkerError(f"{where}: doc-test: skip needs a reason (<!-- doc-test: skip: why -->)")
        snippet.skip = reason
    elif name == "env":
        for pair in text[len("env ") :].split():
            name, sep, value = pair.partition("=")
            if not sep or not name:
                raise MarkerError(f"{where}: doc-test: env takes NAME=VALUE pairs, got '{pair}'")
            snippet.env[name] = value
    elif name == "ci":
        match = CI_REPLACE.match(text)
        if not match:
            raise MarkerError(f"{where}: doc-test: ci takes 'OLD' -> 'NEW': reason, got '{text}'")
        snippet.replacements.append((match.group(1), match.group(2)))
    elif name == "exit":
        snippet.exit_status = int(text[len("exit ") :])
    elif name == "prints" and text == "prints":
        snippet.prints = True
    else:
        raise MarkerError(f"{where}: unknown doc-test marker '{text}' (skip, env, ci, exit or prints)")


def read_snippets(path: Path) -> List[Snippet]:
    """Every fenced block of ``path`` in order, with the doc-test markers right above it applied."""
    lines = Path(path).read_text().splitlines()
    snippets, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, language = opening.groups()
        body, end = [], index + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and lines[end].strip(fence[0]).strip() == ""
        ):
            body.append(lines[end][len(indent) :] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        snippet = Snippet(Path(path), index + 1, language.lower(), "\n".join(body) + "\n")
        above = index - 1
        while above >= 0 and MARKER.match(lines[above]):
            _apply_marker(snippet, MARKER.match(lines[above]).group(1), f"{path}:{above + 1}")
            above -= 1
        snippets.append(snippet)
        index = end + 1
    return snippets


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkout(repo: Path, destination: Path, records: Dict[str, int]) -> Path:
    """A copy of the checkout at ``destination`` (another path than the one installed: a moved checkout),
    its ``.venv`` linked, and the shipped data files cut to ``records[split]`` records each."""
    shutil.copytree(repo, destination, ignore=NOT_COPIED, symlinks=True)
    venv = repo / ".venv"
    if venv.exists():
        (destination / ".venv").symlink_to(venv)
    for data_file in (destination / "cube_examples" / "finetune_hf_model" / "data").glob("*_*.json"):
        split = data_file.stem.rsplit("_", 1)[1]
        kept = data_file.read_text().splitlines()[: records.get(split, 10**9)]
        data_file.write_text("\n".join(kept) + "\n")
    return destination


def scaled_env(scale: Dict[str, str]) -> Dict[str, str]:
    """The environment of a user who activated the venv, plus the scaling-down variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(scale)
    return env


def run_snippet(snippet: Snippet, checkout: Path, env: Dict[str, str], timeout: int = 600):
    """Run one snippet in ``checkout``; returns (exit status, output). A file snippet is written, not run."""
    target = snippet.target_file
    if target:
        path = checkout / target
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(snippet.command())
        return 0, f"appended to {target}"
    full_env = dict(env, MASTER_PORT=str(free_port()), **snippet.env)
    if RUN_LANGUAGES[snippet.language] == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", snippet.command()]
    else:
        script = checkout / f".doc_snippet_{snippet.path.stem}_{snippet.line}.py"
        script.write_text(snippet.command())
        cmd = [sys.executable, str(script)]
    result = subprocess.run(cmd, cwd=checkout, env=full_env, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def line_pattern(line: str, checkout: Path) -> re.Pattern:
    """A quoted output line as a pattern: numbers match any number, whitespace runs any whitespace."""
    parts = []
    for word in line.replace("/path/to/repo", str(checkout)).split():
        pieces = NUMBER.split(word)
        numbers = ["[-+]?\\d+(?:[.,]\\d+)*(?:e[-+]?\\d+)?"] * (len(pieces) - 1)
        parts.append("".join(re.escape(piece) + (numbers.pop() if numbers else "") for piece in pieces))
    return re.compile(r"\s+".join(parts))


def missing_lines(quoted: str, output: str, checkout: Path) -> List[str]:
    """The lines of a quoted output that the real output lacks (``...`` lines and blank lines left out)."""
    return [
        line
        for line in quoted.splitlines()
        if line.strip() and line.strip() != "..." and not line_pattern(line, checkout).search(output)
    ]


def failure_report(snippet: Snippet, status: int, output: str, tail: int = 4000) -> str:
    return (
        f"{snippet.where()}: the {snippet.language} block exited {status} (expected {snippet.exit_status}):\n"
        f"{snippet.command()}--- its output (last {tail} characters) ---\n{output[-tail:]}"
    )


def run_markdown(path: Path, repo: Path, scratch: Path, scale: Dict[str, str], records: Dict[str, int]) -> List[str]:
    """Run every snippet of ``path`` in order in a scratch checkout; returns a line per snippet run or skipped,
    and raises AssertionError at the first one whose exit status is not the expected one."""
    snippets = read_snippets(path)
    checkout = make_checkout(repo, scratch / "checkout", records)
    env = scaled_env(scale)
    log, output = [], ""
    for snippet in snippets:
        if snippet.prints:
            missing = missing_lines(snippet.code, output, checkout)
            if missing:
                raise AssertionError(
                    f"{snippet.where()}: the quoted output has lines the block above did not print:\n"
                    + "\n".join(missing)
                    + "\n--- what it printed (last 4000 characters) ---\n"
                    + output[-4000:]
                )
            log.append(f"{snippet.where()}: output matches")
        if snippet.language not in RUN_LANGUAGES:
            continue
        if snippet.skip:
            log.append(f"{snippet.where()}: skipped: {snippet.skip}")
            continue
        status, output = run_snippet(snippet, checkout, env)
        if status != snippet.exit_status:
            raise AssertionError(failure_report(snippet, status, output))
        log.append(f"{snippet.where()}: ok")
    return log
