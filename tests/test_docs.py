"""The docs' console sessions, run: a shown output that drifts from what the command prints fails.

A fenced block is checked when the line before its opening fence is ``<!-- doc-test -->``.  In it,
``$ cmd`` lines are commands (a trailing backslash continues one) and the lines up to the next
``$`` are the output shown.  All checked blocks of one file run in one bash session, in order,
from the repository root (so ``export`` and ``cd`` carry over, and ``echo $?`` works); blocks
marked ``<!-- doc-test session=NAME -->`` run in a session of their own, side by side with the
others (commands that need no state, to keep the test short).  Sessions run with
stderr merged into stdout, no colour, and fresh, empty user locations: ``$QFLASH_GEN_DB``, the
kernel cache and the study storage live in a temporary folder.  Blocks of GPU-only commands are
not marked (the docs label them as GPU runs).

Comparison, line by line, after stripping trailing blanks:

* ``/tmp/demo`` in a command is a fresh temporary folder, shown again as ``/tmp/demo``;
  the repository's absolute path is shown relative (``tuning_db/h100.yaml``);
* a line ``...`` stands for any number of lines (output cut for the page);
* ``[...]`` inside a line stands for any text (timings, dates).

After a change that alters an output on purpose (a template change alters the rendered header),
rewrite the shown outputs with ``QFLASH_DOCS_UPDATE=1 python -m pytest tests/test_docs.py`` and
review the diff.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^<!-- doc-test(?: session=(\w+))? -->$")
DEMO = "/tmp/demo"
UPDATE = os.environ.get("QFLASH_DOCS_UPDATE", "") not in ("", "0")
DOCS = ["README.md", "docs/inspecting.md", "docs/energy.md", "docs/reliability.md"]


@dataclasses.dataclass
class Command:
    session: str
    text: str  # the command, continuations joined
    line: int  # 1-based line of its "$"
    expected: list[str]
    out_start: int  # 0-based index in the file's lines where its shown output starts
    out_end: int


def parse(path: Path) -> list[Command]:
    """Commands of the checked blocks of ``path``, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        mark = MARK.match(lines[i].strip())
        if mark is None:
            if lines[i].strip().startswith("<!-- doc-test"):
                raise AssertionError(f"{path}:{i + 1}: a doc-test marker is <!-- doc-test --> or <!-- doc-test session=NAME -->")
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or not lines[j].startswith("```"):
            raise AssertionError(f"{path}:{i + 1}: a doc-test marker must stand right before a fenced block")
        k = j + 1
        current: Command | None = None
        while k < len(lines) and not lines[k].startswith("```"):
            text = lines[k]
            if text.startswith("$ "):
                start = k
                cmd = text[2:]
                while cmd.endswith("\\") and k + 1 < len(lines):
                    k += 1
                    cmd = cmd[:-1] + " " + lines[k].strip()
                current = Command(mark[1] or "main", cmd.strip(), start + 1, [], k + 1, k + 1)
                out.append(current)
            elif current is not None:
                current.expected.append(text.rstrip())
                current.out_end = k + 1
            else:
                raise AssertionError(f"{path}:{k + 1}: output before any '$ command' in a checked block")
            k += 1
        i = k + 1
    return out


def _run(path: Path, commands: list[Command], tmp: Path) -> list[list[str]]:
    """Run ``commands`` in one bash session; the normalized output of each."""
    token = f"@@doc-test-{uuid.uuid4().hex}@@"
    script = ["__rc=0"]
    for n, c in enumerate(commands):
        script += [f"printf '\\n{token} {n}\\n'", "(exit $__rc)", f"{{ {c.text.replace(DEMO, str(tmp))}\n}} 2>&1", "__rc=$?"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QFLASH_GEN", "TRITON_INTERPRET"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        NO_COLOR="1",
        QFLASH_GEN_DB=str(tmp / "user-db"),
        QFLASH_GEN_CACHE=str(tmp / "kernel-cache"),
        QFLASH_GEN_TUNE_STORAGE=str(tmp / "user-studies.journal"),
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    chunks = proc.stdout.split(f"\n{token} ")
    outputs: dict[int, list[str]] = {}
    for chunk in chunks[1:]:
        head, _, body = chunk.partition("\n")
        outputs[int(head)] = _normalize(body, tmp)
    assert len(outputs) == len(commands), f"{path}: the session stopped early: {proc.stderr[-2000:]}"
    return [outputs[n] for n in range(len(commands))]


def _normalize(text: str, tmp: Path) -> list[str]:
    text = text.replace(str(tmp), DEMO).replace(f"{ROOT}/", "").replace(str(ROOT), ".")
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _line_re(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(p) for p in pattern.split("[...]")) + r"\Z")


def matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` (with ``...`` lines and ``[...]`` spans) against ``actual``."""
    pats = [None if e == "..." else _line_re(e) for e in expected]
    memo: dict[tuple[int, int], bool] = {}

    def go(i: int, j: int) -> bool:
        if (i, j) in memo:
            return memo[(i, j)]
        if i == len(pats):
            ok = j == len(actual)
        elif pats[i] is None:
            ok = go(i + 1, j) or (j < len(actual) and go(i, j + 1))
        else:
            ok = j < len(actual) and bool(pats[i].match(actual[j])) and go(i + 1, j + 1)
        memo[(i, j)] = ok
        return ok

    return go(0, 0)


def _updated(expected: list[str], actual: list[str]) -> list[str]:
    """The shown output rewritten from ``actual``, keeping the page's cuts (``...``) and the
    ``[...]`` lines that still match."""
    if "..." not in expected:
        head, tail = actual, []
        cut = False
    else:
        first = expected.index("...")
        last = len(expected) - 1 - expected[::-1].index("...")
        n_head, n_tail = first, len(expected) - 1 - last
        head, tail = actual[:n_head], actual[len(actual) - n_tail :] if n_tail else []
        cut = True
    keep = {i: e for i, e in enumerate(expected) if "[...]" in e}
    head = [keep[i] if i in keep and _line_re(keep[i]).match(a) else a for i, a in enumerate(head)]
    return head + (["..."] if cut else []) + tail


def _sessions(doc: str) -> dict[str, list[Command]]:
    out: dict[str, list[Command]] = {}
    for c in parse(ROOT / doc):
        out.setdefault(c.session, []).append(c)
    return out


def _compare(doc: str, results: list[tuple[Command, list[str]]]) -> list[str]:
    """Failures of one doc (or, with QFLASH_DOCS_UPDATE, the doc rewritten and none)."""
    path = ROOT / doc
    failures = []
    new_lines = path.read_text(encoding="utf-8").splitlines()
    for c, actual in sorted(results, key=lambda r: r[0].line, reverse=True):
        if matches(c.expected, actual):
            continue
        if UPDATE:
            new_lines[c.out_start : c.out_end] = _updated(c.expected, actual)
            continue
        shown = "\n".join(actual[:60]) + ("\n[... more lines]" if len(actual) > 60 else "")
        want = "\n".join(c.expected)
        failures.append(f"{doc}:{c.line}: $ {c.text}\n--- shown in the doc:\n{want}\n--- printed now:\n{shown}")
    if UPDATE:
        path.write_text("\n".join(new_lines) + "\n", encoding="utf-8")
    return failures[::-1]


def test_matching_rules():
    assert matches(["a", "...", "z"], ["a", "b", "c", "z"]) and matches(["a", "..."], ["a"])
    assert matches(["wall time [...] s"], ["wall time 0.3 s"]) and not matches(["a"], ["a", "b"])
    assert not matches(["x [...] y"], ["x 1 z"])
    assert _updated(["a", "...", "z"], ["A", "b", "Z"]) == ["A", "...", "Z"]


def test_every_marker_opens_a_block():
    for doc in DOCS:
        parse(ROOT / doc)  # raises on a stray marker
    assert sum(len(parse(ROOT / doc)) for doc in DOCS) >= 10


@pytest.mark.skipif(shutil.which("bash") is None, reason="the docs' sessions are bash")
def test_documented_commands_print_what_the_docs_show(tmp_path):
    """Each (doc, session) in its own bash session and folder; the sessions run side by side."""
    jobs = [(doc, name, cmds) for doc in DOCS for name, cmds in _sessions(doc).items()]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        futures = []
        for n, (doc, _, cmds) in enumerate(jobs):
            d = tmp_path / f"s{n}"
            d.mkdir()
            futures.append(pool.submit(_run, ROOT / doc, cmds, d))
        results: dict[str, list[tuple[Command, list[str]]]] = {}
        for (doc, _, cmds), fut in zip(jobs, futures, strict=True):
            results.setdefault(doc, []).extend(zip(cmds, fut.result(), strict=True))
    failures = [f for doc, res in results.items() for f in _compare(doc, res)]
    hint = "\n\nIf the change is intended: QFLASH_DOCS_UPDATE=1 python -m pytest tests/test_docs.py, then review the diff."
    assert not failures, "\n\n".join(failures) + hint
