"""What a newcomer reads: README.md and docs/. Every relative link resolves (a heading anchor must name
a heading of its page), every ``python -m negstudy ...`` line in a code block composes as a Hydra
override list against the real config (composed only, never run), the README stays short and keeps
the commands .ci/run runs, mkdocs.yml lists every page, and ``--help`` lists only options a user picks.
The checkers are also fed planted mistakes, so a broken link or a bad override cannot pass unseen."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

from negstudy.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000  # characters

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
JOINERS = {"&&", "||", ";", "|"}
register_configs()


# ----------------------------------------------------------------------------- the checkers


def prose_and_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): code is inside ``` / ~~~ fences or indented by four spaces."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced or line.startswith("    ") else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_and_code(text)[0]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def link_problems(page: Path) -> list[str]:
    """Relative links of ``page`` (outside code) whose file does not exist, or whose #anchor names no
    heading of its Markdown page; web links are not followed."""
    problems = []
    for line in prose_and_code(page.read_text())[0]:
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                problems.append(f"{page.name}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                problems.append(f"{page.name}: {target}: no heading '#{anchor}' in {file.name}")
    return problems


def negstudy_commands(text: str) -> list[list[str]]:
    """The arguments of every ``python -m negstudy`` in the code of ``text`` (continuation lines
    joined, comments dropped, stopping at ``&&``, ``;`` or ``|``)."""
    lines, commands = prose_and_code(text)[1], []
    while lines:
        line = lines.pop(0)
        while line.rstrip().endswith("\\") and lines:
            line = line.rstrip()[:-1] + " " + lines.pop(0).strip()
        if not re.search(r"-m\s+negstudy(\s|$)", line):
            continue
        tokens = []
        for token in shlex.split(line, comments=True):  # "sinfo; python -m negstudy ..."
            tokens += [token[:-1], ";"] if token.endswith(";") and len(token) > 1 else [token]
        for i in range(len(tokens) - 1):
            if tokens[i] == "-m" and tokens[i + 1] == "negstudy":
                args = []
                for t in tokens[i + 2:]:
                    if t in JOINERS:
                        break
                    args.append(t)
                commands.append(args)
    return commands


def override_problems(args: list[str]) -> list[str]:
    """Why ``args`` are not a valid override list for negstudy's config (empty when they are).
    Hydra must be initialised (``initialize_config_module``). A sweep (``k=0,5,10``) is composed
    once per value."""
    where = "python -m negstudy " + " ".join(args)
    flags = [a for a in args if a.startswith("-")]
    unknown = [f for f in flags if f not in ("-m", "--multirun")]
    if unknown:
        return [f"{where}: unknown flag {', '.join(unknown)}"]
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception as err:  # noqa: BLE001 - the parser's message is the finding
        return [f"{where}: {str(err).splitlines()[0]}"]
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
             for o in parsed]
    variants = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            variants += [first[:i] + [f"{o.get_key_element()}={v}"] + first[i + 1:] for v in list(o.sweep_string_iterator())[1:]]
    for overrides in variants:
        try:
            compose(config_name="config", overrides=overrides, return_hydra_config=True)
        except Exception as err:  # noqa: BLE001
            return [f"{where}: {type(err).__name__}: {str(err).splitlines()[0]}"]
    return []


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        yield


# ----------------------------------------------------------------------------- the pages


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_negstudy_command_composes(hydra_ctx, page):
    problems = [p for args in negstudy_commands(page.read_text()) for p in override_problems(args)]
    assert problems == []


def test_the_pages_show_commands_to_check():
    counts = {p.name: len(negstudy_commands(p.read_text())) for p in PAGES}
    assert counts["README.md"] >= 10 and sum(counts.values()) >= 30, counts


def test_readme_is_short_and_keeps_the_commands_ci_runs():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= README_LIMIT
    code = prose_and_code(text)[1]
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("bash scripts/setup.sh", ".venv/bin/python -m pytest"):
        assert command in code and command in ci.splitlines()
    assert "![" in text and "(docs/report.png)" in text  # the one picture
    assert text.count("<!-- findings:start") == 1 and text.count("<!-- findings:end -->") == 1


def test_mkdocs_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["name"] == "material" and config.get("docs_dir", "docs") == "docs"
    nav = [next(iter(entry.values())) for entry in config["nav"]]
    assert sorted(nav) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def test_help_lists_only_options_a_user_picks():
    proc = subprocess.run([sys.executable, "-m", "negstudy", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "_schema" not in groups
    for group in ("model", "dataset", "schedule", "guidance", "evaluator", "logger", "sweep"):
        listed = re.search(rf"^{group}: (.*)$", groups, re.M)
        assert listed is not None, group
        assert listed.group(1).split(", ") == sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


# ----------------------------------------------------------------------------- the checkers catch mistakes


def test_planted_broken_links_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section (`+sweep=x`)\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[fine](other.md) [fine too](other.md#a-section-sweepx) [here](#page) "
                    "[web](https://example.org/x.md)\n![picture](missing.png)\n[gone](nope.md) [bad anchor](other.md#nowhere)\n"
                    "[own anchor](#nothing)\n\n```bash\n[in code](ignored.md)\n```\n")
    assert link_problems(page) == ["page.md: missing.png: no such file", "page.md: nope.md: no such file",
                                   "page.md: other.md#nowhere: no heading '#nowhere' in other.md",
                                   "page.md: #nothing: no heading '#nothing' in page.md"]


def test_planted_bad_overrides_are_reported(hydra_ctx):
    text = "\n".join([
        "```bash",
        ".venv/bin/python -m negstudy schedule=window schedule.start=5   # fine",
        "python -m negstudy -m schedule=first_k schedule.k=0,2,4 \\",
        "    guidance_scale=5,7.5                                          # fine, a sweep on two lines",
        "python -m negstudy schedule=nonexistent",
        "python -m negstudy steps=many",
        "python -m negstudy schedule=from_step schedule.begin=3",
        "python -m negstudy -m steps=30,many",
        "python -m negstudy 'seeds=[1,2'",
        "python -m negstudy --cfg job",
        "```",
        "",
        "    python -m negstudy +sweep=no_such_study        # an indented code block counts too",
        "",
        "Prose is not checked: python -m negstudy steps=many",
    ])
    commands = negstudy_commands(text)
    assert len(commands) == 9 and commands[1] == ["-m", "schedule=first_k", "schedule.k=0,2,4", "guidance_scale=5,7.5"]
    problems = [override_problems(args) for args in commands]
    assert problems[:2] == [[], []]
    assert all(len(p) == 1 for p in problems[2:]), problems
    assert "schedule=nonexistent" in problems[2][0] and "steps=many" in problems[3][0]
    assert "schedule.begin" in problems[4][0] and "steps=30,many" in problems[5][0]
    assert "unknown flag --cfg" in problems[7][0] and "no_such_study" in problems[8][0]


def test_the_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` (the test extra installs mkdocs-material): a page missing from the nav, a broken
    link between pages, a bad anchor or a theme error fails it; links out of docs/ are read on GitHub (info only)."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed: pip install -e '.[test]' installs it")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "findings" / "index.html").exists()
    assert "Instrument checks" in (tmp_path / "site" / "findings" / "index.html").read_text()
