"""The documentation against the code: every environment variable the code reads is on the configuration page,
every relative link in the README and docs/ resolves inside the repository, the README's table of sizes is
what scripts/sizes.py writes from the manifest, and the README stays an entrance."""

import ast
import re
from pathlib import Path

import pytest

import weights
from scripts import sizes
from scripts.cog_config import ROOT

CONFIG = ROOT / "docs" / "configuration.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PY_FOLDERS = ("cog_base", "models", "predictors", "weights", "scripts", "bench")
# Bash's own variables, never an environment setting.
SHELL_OWN = {"PIPESTATUS", "BASH_SOURCE", "RANDOM", "LINENO", "FUNCNAME", "BASHPID", "SECONDS", "IFS", "OPTARG", "OPTIND"}


# -- environment variables --------------------------------------------------------------------------

def _python_reads(tree: ast.AST) -> set[str]:
    """Names read through os.environ.get/[]/setdefault/pop, `in os.environ`, os.getenv, and a local alias
    such as `env = os.environ.get` (then `env("NAME")`). Names held in module-level constants resolve."""
    constants = {t.id: node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for t in node.targets if isinstance(t, ast.Name)}
    environ = {"os.environ", "environ"}
    aliases = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and ast.unparse(node.value) in {"os.environ.get", "os.getenv", "environ.get"}
               for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = ast.unparse(node.func)
            if func in {"os.getenv", "getenv", *aliases} or (
                    isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "setdefault", "pop")
                    and ast.unparse(node.func.value) in environ):
                found.append(node.args[0])
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and ast.unparse(node.value) in environ:
            found.append(node.slice)
        elif isinstance(node, ast.Compare) and any(ast.unparse(c) in environ for c in node.comparators):
            found.append(node.left)
    names = set()
    for arg in found:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
        elif isinstance(arg, ast.Name) and arg.id in constants:
            names.add(constants[arg.id])
    return names


def _shell_reads(text: str) -> set[str]:
    """`${NAME:-default}`-style reads, and `$NAME` / `${NAME}` of a name the script never assigns."""
    code = "\n".join(line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))
    assigned = set(re.findall(r"(?:^|[\s;(&|]|export |local )([A-Za-z_]\w*)=", code, re.M))
    assigned |= set(re.findall(r"\bfor ([A-Za-z_]\w*) in\b", code)) | set(re.findall(r"\bread (?:-\w+ )*([A-Za-z_]\w*)", code))
    defaulted = set(re.findall(r"\$\{([A-Za-z_]\w*)(?::?[-=+?])", code))
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", code))
    return {n for n in defaulted | (used - assigned) if n not in SHELL_OWN}


def _makefile_reads(text: str) -> set[str]:
    """Make variables the environment or the command line may set (`NAME ?=`, and `$(NAME)` of a name the
    Makefile never defines), and `$$NAME` shell reads in recipes."""
    settable = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*\?=", text, re.M))
    defined = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|=|\+=)", text, re.M))
    used = set(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", text))
    shell = set(re.findall(r"\$\$\{?([A-Z_][A-Z0-9_]*)", text))
    return settable | (used - defined - settable) | shell


def environment_reads() -> dict[str, set[str]]:
    reads: dict[str, set[str]] = {}
    for folder in PY_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _python_reads(ast.parse(path.read_text())):
                reads.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    scripts = {p for p in ROOT.rglob("*.sh") if ".venv" not in p.parts and "build" not in p.parts}
    scripts |= {p for p in (ROOT / ".ci").glob("*") if p.is_file() and p.read_text().startswith("#!/usr/bin/env bash")}
    for path in sorted(scripts):
        for name in _shell_reads(path.read_text()):
            reads.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    for name in _makefile_reads((ROOT / "Makefile").read_text()):
        reads.setdefault(name, set()).add("Makefile")
    return reads


def test_the_scanner_finds_reads_of_every_kind():
    tree = ast.parse("import os\nA = 'CONST_NAME'\nenv = os.environ.get\nos.environ.get('X1')\nos.environ['X2']\n"
                     "os.getenv('X3')\nos.environ.setdefault('X4', '1')\n'X5' in os.environ\nenv('X6')\nos.environ.get(A)\n"
                     "os.environ['NOT_A_READ'] = '1'\n")
    assert _python_reads(tree) == {"X1", "X2", "X3", "X4", "X5", "X6", "CONST_NAME"}
    assert _shell_reads("A=${ENV_A:-x}\nb=1\necho $b $ENV_B ${ENV_C} $A\nfor f in 1; do echo $f; done\n") == {
        "ENV_A", "ENV_B", "ENV_C"}
    assert _makefile_reads("X ?= 1\nY := $(X)\nt:\n\techo $(Y) $(Z) $$HOME\n") == {"X", "Z", "HOME"}


def test_every_environment_variable_the_code_reads_is_on_the_configuration_page():
    reads = environment_reads()
    # The scan sees the settings this page exists for (a scanner that found nothing would pass any page).
    assert {"CONTROLNET_WEIGHTS_DIR", "CONTROLNET_BLOCK_PRIVATE_URLS", "CONTROLNET_ASSET_CACHE_MB", "COG_WEIGHTS",
            "CONTROLNET_COG_CACHE", "COND", "REF"} <= set(reads)
    page = CONFIG.read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", page))
    missing = {name: sorted(where) for name, where in reads.items() if name not in documented}
    assert not missing, f"read by the code but not on docs/configuration.md: {missing}"


def test_the_configuration_page_documents_the_hugging_face_and_cog_settings_the_project_relies_on():
    page = CONFIG.read_text()
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE", "COG_WEIGHTS", "COG_PREDICT_CODE_STRIP",
                 "KUBERNETES_SERVICE_HOST"):
        row = re.search(rf"^\| `{name}`.*\|.*\|.*\|$", page, re.M)
        assert row, f"{name} has no row (variable | default | effect)"


# -- links ----------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.*)", line)
        if match:
            slug = _slug(match.group(1))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{target} leaves the repository")
        elif not resolved.exists():
            problems.append(f"{target} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with that anchor")
    # Paths written as text (not links) must not leave the repository either.
    for text_path in re.findall(r"(?<![\w/])((?:\.\./)+[\w./-]+)", page.read_text()):
        if not (page.parent / text_path).resolve().is_relative_to(ROOT):
            problems.append(f"{text_path} leaves the repository")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page):
    assert broken_links(page) == []


def test_the_link_checker_catches_each_kind_of_broken_link():
    page = ROOT / "build" / "docs-check" / "page.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("[a](../../README.md#two-commands) [b](../../docs/nothing.md) [c](../../../outside.md) "
                    "[d](../../docs/serving.md#no-such-heading) [e](https://example.com/x) see ../../../notes/x.md\n"
                    "```\n[f](not-checked-in-code.md)\n```\n")
    try:
        assert broken_links(page) == ["../../docs/nothing.md does not exist", "../../../outside.md leaves the repository",
                                      "../../docs/serving.md#no-such-heading: no heading with that anchor",
                                      "../../../outside.md leaves the repository",
                                      "../../../notes/x.md leaves the repository"]
    finally:
        page.unlink()
    assert _slug("Testing a real image: `make image-test COND=canny`") == "testing-a-real-image-make-image-test-condcanny"


# -- the README as an entrance, docs as pages ---------------------------------------------------------

def test_the_readme_is_an_entrance_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15_500, f"README.md is {len(readme.encode())} bytes; move detail to docs/"
    contents = (ROOT / "docs" / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name}" in contents, f"docs/README.md does not list {page.name}"
            assert f"](docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    assert "make test-all" in readme and re.search(r"^make test\b", readme, re.M)


# -- one source for the sizes -----------------------------------------------------------------------------

def test_the_readmes_table_of_sizes_is_what_the_generator_writes():
    sizes.main(["--check"])  # exits when stale


def test_the_sizes_come_from_the_manifest(monkeypatch):
    components = weights.MANIFEST["components"]
    canny = sizes.row("canny")
    expected = sum(components[n]["size_mb"] for n in weights.components("canny").values()) / 1000
    assert canny[1] == f"{expected:.2f}"
    # 1.0's fp32 ControlNet takes half its size on the GPU; the 1.1 one is stored in fp16 already.
    base, net10, net11 = (components[n]["size_mb"] / 1000 for n in
                          ("stable-diffusion-v1-5", "sd-controlnet-canny", "control_v11p_sd15_canny"))
    assert canny[3] == f"{base + net10 / 2:.2f}; {base + net10 / 2 + net11:.2f} once a 1.1 request came"
    monkeypatch.setitem(components["sd-controlnet-canny"], "size_mb", 1000.0)
    assert sizes.row("canny") != canny
    text = (ROOT / "README.md").read_text()
    assert sizes.render(text) != text  # a changed manifest makes the committed table stale
    assert all("size_mb" in spec for spec in components.values())


def test_the_python_page_runs_as_written(tmp_path, monkeypatch):
    """docs/python.md's example, run as written (from the repository's root, on the tiny weights)."""
    (code,) = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python.md").read_text(), re.S)
    monkeypatch.chdir(tmp_path)  # its outputs/ folder, not the repository's
    (tmp_path / "outputs").mkdir()
    namespace: dict = {}
    exec(compile(code, "docs/python.md", "exec"), namespace)
    assert len(namespace["files"]) == 2
    assert namespace["control_map"].size == namespace["sample"].size == (704, 512)  # 640x480 at 512: 64-multiples
