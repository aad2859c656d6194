"""The README and docs/: every relative link resolves (files and #anchors), and nothing in
the repository speaks of how it was developed, or cites documents users do not have."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "build", "dist"}
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".json", ".txt", ".cfg", ".ini", ""}


def files(*tops: str, suffixes=TEXT_SUFFIXES) -> list[Path]:
    found = []
    for top in tops:
        path = ROOT / top
        candidates = [path] if path.is_file() else path.rglob("*")
        for p in candidates:
            if p.is_file() and p.suffix in suffixes and not (set(p.relative_to(ROOT).parts) & SKIP_DIRS) \
                    and not any(part.endswith(".egg-info") for part in p.parts):
                found.append(p)
    return sorted(found)


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *files("docs", suffixes={".md"})]


# --------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed,
    spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\w)|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    """The targets of the page's markdown links and images, outside code blocks and spans."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def test_the_checker_knows_github_anchors():
    assert slug("RL: `GRPOConfig` (objectives grpo, nft, awm)") == "rl-grpoconfig-objectives-grpo-nft-awm"
    assert slug("The dot grid: where it comes from, how to measure it, how to avoid it") == \
        "the-dot-grid-where-it-comes-from-how-to-measure-it-how-to-avoid-it"
    assert slug("SFT → RL") == "sft--rl"


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_short_and_points_to_the_gpu_path():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for needed in ('pip install -e ".[hf]"', "configs/flux2-klein-sft.yaml", "No GPU run", "make quickstart",
                   "make test", "## Use from Python"):
        assert needed in text, needed


# --------------------------------------------------------------------------- the development process

PROCESS = re.compile(r"\b(session|issue)s?[\s_-]*#?\d+", re.I)
PRIVATE_DOCS = re.compile(r"\b(METHODS|DESIGN|STYLE)\.md\b")  # developer notes that are not in the repo


def test_no_development_process_in_readme_docs_src_tests_configs():
    hits = []
    for path in [ROOT / "README.md", *files("docs", "src", "tests", "configs", "scripts", "benchmarks")]:
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if PROCESS.search(line) or PRIVATE_DOCS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_the_process_check_catches_what_it_should():
    word, other = "Session", "issue"  # split, so that this file passes its own check
    for text in (f"in {word} 8 we", f"the {word.lower()}-10 preset", f"{word}8.png", f"see {other} #13",
                 f"{other}s 3"):
        assert PROCESS.search(text), text
    for text in ("one session of training", "a tissue 3", "sessions of work"):
        assert not PROCESS.search(text), text


def test_readme_commands_are_make_targets_and_its_quickstart_output_matches_the_guide():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands\n\n```bash\n(.*?)```", readme, re.S).group(1)
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    assert [c[:1] for c in commands] == [["make"], ["make"]] and {c[1] for c in commands} <= targets
    table = re.compile(r"```\n(reward +SFT \(tiny-sft\) +after GRPO +change\n.*?)```", re.S)
    guide = (ROOT / "docs" / "getting-started" / "quickstart.md").read_text()
    assert table.search(readme).group(1) == table.search(guide).group(1)


def test_architecture_page_shows_the_import_floors_of_pyproject():
    """docs/guides/architecture.md draws the floors of [tool.importlinter]; a new floor must
    be drawn there too."""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    page = (ROOT / "docs" / "guides" / "architecture.md").read_text()
    drawn = re.search(r"```\n(__main__\n.*?)```", page, re.S).group(1)
    rows = [re.split(r"\s{3,}", line.strip())[0] for line in drawn.splitlines() if line.strip()]
    assert rows == [" | ".join(x.strip() for x in layer.split("|")) for layer in layers], \
        "update the floors drawn in docs/guides/architecture.md to pyproject.toml's [tool.importlinter] layers"
