"""The README and the example config say what the code does."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import yaml

from cryptfs import cli, config, errors

from conftest import REPO

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
EXAMPLE = os.path.join(REPO, "config", "cryptfs.example.yaml")


def test_exit_code_table_matches_errors_module():
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", README, re.M))
    codes = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert {int(c) for c in table} == codes
    assert "wrong passphrase" in table[str(errors.EXIT_AUTH)]
    assert "not found" in table[str(errors.EXIT_NOT_FOUND)]
    assert "integrity" in table[str(errors.EXIT_INTEGRITY)]
    assert "unreachable" in table[str(errors.EXIT_NETWORK)]
    assert "no credentials" in table[str(errors.EXIT_ACCESS)]
    assert "already exists" in table[str(errors.EXIT_EXISTS)]
    assert "disk full" in table[str(errors.EXIT_NO_SPACE)]
    assert "lease" in table[str(errors.EXIT_IN_USE)]


def test_every_cli_command_is_documented():
    parser = cli.build_parser()
    commands = set(next(a for a in parser._actions if a.dest == "command").choices)
    documented = set(re.findall(r"^### (\w+) — ", README, re.M))
    assert documented <= commands
    assert commands - documented <= {"mount", "umount"}   # documented with the mount


def test_example_config_loads_and_shows_every_setting():
    volumes = config.load(EXAMPLE)
    assert len(volumes) == 2
    with open(EXAMPLE) as f:
        doc = yaml.safe_load(f)
    every = {f.name for f in dataclasses.fields(config.VolumeSettings)}
    assert any(set(entry) == every for entry in doc["volumes"].values())
    page = open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| `(\w+)` \|.*\| (?:`(--[\w-]+)`|[^|]*) \|$", page, re.M)
    assert every <= {key for key, _ in rows}
    flags = {flag for _, flag in rows if flag}
    parser_flags = set()
    for action in cli.build_parser()._subparsers._group_actions[0].choices["mount"]._actions:
        parser_flags.update(action.option_strings)
    assert len(flags) > 10 and flags <= parser_flags, flags - parser_flags


def test_development_guide_names_only_what_exists():
    """Every module, script and test file DEVELOPMENT.md names is in the tree."""
    page = open(os.path.join(REPO, "DEVELOPMENT.md"), encoding="utf-8").read()
    named = set(re.findall(r"\b((?:tests/|scripts/|backend/|docs/)?[\w-]+\.(?:py|sh|md))\b", page))
    assert len(named) > 20
    missing = []
    for name in named:
        candidates = [name, os.path.join("cryptfs", name), os.path.join("cryptfs", "backend", name),
                      os.path.join("docs", name)]
        if not any(os.path.exists(os.path.join(REPO, c)) for c in candidates):
            missing.append(name)
    assert not missing, missing


@pytest.mark.parametrize("doc", ["security.md", "reliability.md"])
def test_pages_cite_tests_that_exist(doc):
    """Every test file and test name the security and reliability tables cite is in the suite."""
    page = open(os.path.join(REPO, "docs", doc), encoding="utf-8").read()
    sources = {name: open(os.path.join(REPO, "tests", name), encoding="utf-8").read()
               for name in os.listdir(os.path.join(REPO, "tests")) if name.endswith(".py")}
    cited_files = set(re.findall(r"\b(test_\w+\.py)\b", page))
    assert cited_files and cited_files <= set(sources), cited_files - set(sources)
    for name in re.findall(r"`(test_\w+?)\*?`", page):
        assert any(f"def {name}" in text for text in sources.values()), name


def test_man_page_and_completions_match_the_parser():
    """docs/man/cryptfs.1 and completions/ are generated from `cryptfs --help`'s parser."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gen-docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    page = open(os.path.join(REPO, "docs", "man", "cryptfs.1"), encoding="utf-8").read()
    for command in ("init", "mount", "umount", "status", "fsck", "decrypt"):
        assert f"cryptfs {command}" in page.replace("\\fR \\fI\\,", " ")
