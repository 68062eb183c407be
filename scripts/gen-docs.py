#!/usr/bin/env python3
"""Writes the man page and the shell completions from the command-line parser itself, so
they never drift from `cryptfs --help`:

    docs/man/cryptfs.1         (man ./docs/man/cryptfs.1)
    completions/cryptfs.bash   (bash: source it, or copy it to .../bash-completion/completions/cryptfs)
    completions/_cryptfs       (zsh: a directory of $fpath)

`--check` writes nothing and exits 1 when a committed file differs from what the parser
gives now (the test suite runs it).
"""

from __future__ import annotations

import argparse
import os
import sys

import shtab
from argparse_manpage.manpage import Manpage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["COLUMNS"] = "80"  # argparse wraps help to the terminal: the same text everywhere

from cryptfs import __version__  # noqa: E402
from cryptfs.cli import build_parser  # noqa: E402

# arguments that name local files or directories (completed as such); the others name
# volume paths, URLs or values
LOCAL_FILES = {"passphrase_file", "new_passphrase_file", "config", "log_file", "sources", "get.dest"}
LOCAL_DIRS = {"cache_dir", "mountpoint", "decrypt.dest"}


def parser_for_completion() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, sub in commands.choices.items():
        for action in sub._actions:
            names = {action.dest, f"{command}.{action.dest}"}
            if names & LOCAL_DIRS:
                action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
            elif names & LOCAL_FILES:
                action.complete = shtab.FILE  # type: ignore[attr-defined]
    return parser


def man_page() -> str:
    page = Manpage(build_parser())
    page.date = __version__  # the version, not the day: the page changes only with the parser
    page.source = f"cryptfs {__version__}"
    page.manual = "cryptfs manual"
    page.description = "end-to-end encrypted files on S3 or a local directory"
    return str(page)


def outputs() -> dict[str, str]:
    return {
        "docs/man/cryptfs.1": man_page(),
        "completions/cryptfs.bash": shtab.complete(parser_for_completion(), "bash"),
        "completions/_cryptfs": shtab.complete(parser_for_completion(), "zsh"),
    }


def main() -> int:
    check = sys.argv[1:] == ["--check"]
    stale = []
    for rel, text in outputs().items():
        path = os.path.join(REPO, rel)
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current == text:
            continue
        stale.append(rel)
        if not check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if check and stale:
        print(f"gen-docs: out of date: {', '.join(stale)} (run python3 scripts/gen-docs.py)", file=sys.stderr)
        return 1
    for rel in stale:
        print(f"gen-docs: wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
