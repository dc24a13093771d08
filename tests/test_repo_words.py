"""The repository speaks to users about the project, not about how its work was organised: no working-process
words (work-iteration numbers, work sessions, tracker references, paths of the machine it was written on) in any
tracked text file. Figures are dated by the commit that recorded them instead (docs/DECISIONS.md)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PATTERNS = {
    "work-iteration number": re.compile(r"\bstops? \d+", re.IGNORECASE),
    "work session": re.compile(r"\bsession\b", re.IGNORECASE),
    "tracker reference": re.compile(r"\bissue \d+\b|\(issue \"", re.IGNORECASE),
    "this task": re.compile(r"\bthis task\b", re.IGNORECASE),
    "a later session": re.compile(r"\ba later session\b", re.IGNORECASE),
    "path outside the repository": re.compile(r"/work/|\.\./shared/"),
}

ALLOWED_PHRASES = ('scope="session"', "def pytest_sessionfinish(session)", "session.config.pluginmanager",
                   "session.exitstatus")

SKIP_SUFFIXES = {".zst", ".gz", ".bin", ".parquet", ".safetensors", ".png", ".jpg", ".jpeg", ".gif", ".pdf", ".pt",
                 ".npy", ".npz", ".jsonl"}

PENDING: set[str] = set()

SELF = "tests/test_repo_words.py"


def text_files(root: Path) -> list[str]:
    """Tracked files that are text: not data or binary by suffix, valid UTF-8, no NUL byte."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        path = root / name
        if not name or Path(name).suffix.lower() in SKIP_SUFFIXES or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(name)
    return files


def process_words(root: Path, skip: set[str] = frozenset()) -> list[str]:
    """'file:line: kind: text' for every line of a tracked text file that matches a pattern."""
    hits = []
    for name in text_files(root):
        if name in skip:
            continue
        lines = (root / name).read_text(encoding="utf-8").splitlines()
        for no, line in enumerate(lines, 1):
            checked = line
            for phrase in ALLOWED_PHRASES:
                checked = checked.replace(phrase, "")
            for kind, pattern in PATTERNS.items():
                if pattern.search(checked):
                    hits.append(f"{name}:{no}: {kind}: {line.strip()[:120]}")
    return hits


def test_no_process_words_in_tracked_text_files():
    hits = process_words(ROOT, skip={SELF, *PENDING})
    assert not hits, "process words in tracked files:\n" + "\n".join(hits)


def test_the_scan_finds_each_pattern_and_allows_the_listed_phrases(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a.md").write_text("Measured at stop 22 (a later session).\nfine line\nsee issue 12\n"
                                   "The design is in /work/shared/x.md and ../shared/y.\nnot in this task\n"
                                   '(issue "DWM")\n@pytest.fixture(scope="session")\n', encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "stop 3"}\n', encoding="utf-8")
    (tmp_path / "c.bin").write_bytes(b"stop 4\0")
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    hits = process_words(tmp_path)
    assert [h.split(": ")[0:2] for h in hits] == [
        ["a.md:1", "work-iteration number"], ["a.md:1", "work session"], ["a.md:1", "a later session"],
        ["a.md:3", "tracker reference"], ["a.md:4", "path outside the repository"], ["a.md:5", "this task"],
        ["a.md:6", "tracker reference"]]
    assert process_words(tmp_path, skip={"a.md"}) == []
