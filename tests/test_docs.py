"""The tutorial pages run, so the docs cannot rot: every ```python block and every ``lightning-cmp`` command of a
```bash block is executed, and the number run per page is pinned; the docs site builds strictly."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import lightning_cmp
from lightning_cmp.cli import CMPCLI, make_cli
from lightning_cmp.schedule import SCHEDULES
from tests.test_recipes import run_command, workdir

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter:UserWarning")

DOCS = Path(__file__).parents[1] / "docs"
TUTORIALS = ["index.md", "how-cmp-works.md", "choosing.md", "own-module.md", "troubleshooting.md", "recipes.md"]
TUTORIALS += ["large-models.md", "bipartition.md", "asynchronous.md", "scaling-out.md", "faults-and-restarts.md"]
#: the only reasons a block may be left out: it needs hardware CI does not have
SKIP_REASONS = {"gpu", "cluster"}
#: per page: (```python blocks run, lightning-cmp commands built in process, of those also run for real). A block
#: that silently stops running (renamed to ```py, a command moved out of a ```bash block) changes these numbers;
#: update them when you add or remove one.
EXPECTED_RUNS = {
    "index.md": (1, 2, 2),
    "how-cmp-works.md": (1, 0, 0),
    "choosing.md": (6, 0, 0),
    "own-module.md": (3, 0, 0),
    "troubleshooting.md": (9, 0, 0),
    "recipes.md": (0, 13, 6),
    "large-models.md": (1, 0, 0),
    "bipartition.md": (1, 0, 0),
    "asynchronous.md": (1, 0, 0),
    "scaling-out.md": (1, 0, 0),
    "faults-and-restarts.md": (1, 0, 0),
}
#: the examples of troubleshooting.md, each printing one error
EXPECTED_ERRORS = 12
#: lines of ```bash blocks that are not run by the tests: installation and set-up
SETUP = ("python3 -m venv ", "source .venv/bin/activate", "sudo apt-get install ", "python train.py", "mkdocs ")
#: benchmark commands (minutes on several workers): tests/bench runs them on a tiny model instead
BENCHMARKS = ("python -m lightning_cmp.bench.",)
#: multi-node launches (several hosts): tests/strategy/test_data_groups_trainer.py runs torchrun's on loopback
LAUNCHERS = ("torchrun ", "srun ")
#: commands run for real only up to this many worker processes (the CI machine has 2 cores)
MAX_WORKERS = 2

_FENCE = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)\n```", re.DOTALL)
# on the line before a fence: <!-- skip: gpu --> (not run), <!-- build-only --> (commands built, not run for real)
_SKIP = re.compile(r"<!--\s*(?:skip:\s*(?P<reason>[\w-]+)|(?P<build>build-only))\s*-->")
_CLI = ("lightning-cmp ", "python -m lightning_cmp.cli ")


def fenced_blocks(page: str) -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason or None) for every fenced block, the reason taken from the line before it."""
    return _fenced((DOCS / page).read_text())


def _fenced(text: str) -> list[tuple[str, str, str | None]]:
    blocks = []
    for match in _FENCE.finditer(text):
        skip = _SKIP.search(match["before"])
        reason = (skip["reason"] or skip["build"]) if skip else None
        blocks.append((match["lang"], textwrap.dedent(match["code"]), reason))
    return blocks


def python_blocks(page: str) -> list[tuple[str, str | None]]:
    """(code, skip reason or None) for every ```python block."""
    return [(code, reason) for lang, code, reason in fenced_blocks(page) if lang == "python"]


def commands(page: str, run: bool = False) -> list[str]:
    """The ``lightning-cmp`` command lines of the page's ```bash blocks (continuations joined, comments dropped).

    ``run``: only those that run for real: not ``--print_config`` (it runs in process), at most ``MAX_WORKERS``
    workers, and not in a block marked ``<!-- build-only -->`` (variations of commands that do run, whose
    options the in-process build already checks: each real run costs ~13 s of the suite).
    """
    found = []
    for lang, code, reason in fenced_blocks(page):
        if lang != "bash" or (run and reason == "build-only"):
            continue
        for line in code.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("#")[0].split())
            if line.startswith(_CLI):
                if not run or ("--print_config" not in line and _workers(line) <= MAX_WORKERS):
                    found.append(line)
            else:
                listed = not line or line.startswith(SETUP + BENCHMARKS + LAUNCHERS)
                assert listed, f"{page}: run {line!r} in tests/test_docs.py or list it"
    return found


def _launches_workers(code: str) -> bool:
    """A block that starts a multi-process Trainer: Lightning re-runs its script, so it runs as one."""
    return "Trainer(" in code and "devices=2" in code and ".fit(" in code


def _without_trainer(code: str) -> str:
    """The block's definitions only: statements that build or use a Trainer run in the subprocess instead."""
    tree = ast.parse(code)
    tree.body = [s for s in tree.body if "trainer" not in ast.unparse(s).lower()]
    return ast.unparse(tree)


def _cli_args(command: str) -> list[str]:
    args = shlex.split(command)
    return args[1:] if args[0] == "lightning-cmp" else args[3:]


def _workers(command: str) -> int:
    devices = re.search(r"--trainer\.devices[= ](\d+)", command)
    return int(devices[1]) if devices else 2


def _load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def test_every_block_is_run() -> None:
    for page, (python, built, run) in EXPECTED_RUNS.items():
        text = (DOCS / page).read_text()
        blocks = fenced_blocks(page)
        assert 2 * len(blocks) == text.count("```"), f"{page}: a fence the tests do not see (indented?)"
        languages = {lang for lang, _, _ in blocks}
        assert languages <= {"python", "bash", "text"}, f"{page}: use ```python, ```bash or ```text, not {languages}"
        ran = len([code for code, reason in python_blocks(page) if reason is None])
        counts = (ran, len(commands(page)), len(commands(page, run=True)))
        assert counts == (python, built, run), f"{page}: update EXPECTED_RUNS if this is intended"
    assert set(EXPECTED_RUNS) == set(TUTORIALS)


def test_skip_markers_are_only_for_gpu_or_cluster_snippets() -> None:
    for page in TUTORIALS:
        for code, reason in python_blocks(page):
            assert reason is None or reason in SKIP_REASONS, f"{page}: skip: {reason} on\n{code}"


def test_quickstart_is_ten_lines() -> None:
    code = next(code for code, _ in python_blocks("index.md") if 'strategy="cmp"' in code)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10, code


@pytest.mark.parametrize("page", TUTORIALS)
def test_tutorial_blocks_run_in_process(page: str) -> None:
    namespace: dict[str, object] = {"__name__": "tutorial"}
    for code, reason in python_blocks(page):
        if reason is None:
            exec(compile(_without_trainer(code) if _launches_workers(code) else code, page, "exec"), namespace)


def test_troubleshooting_shows_every_error_it_describes() -> None:
    """Every example prints one error: one that stops raising is caught (and the docs build fails on it)."""
    source = (DOCS / "troubleshooting.md").read_text()
    page = _load_hooks().with_outputs(source, "troubleshooting.md")
    outputs = re.findall(r'```text title="Output"\n(.*?)\n```', page, re.DOTALL)
    assert len(outputs) == source.count("<!-- output -->") == 8
    errors = re.findall(r"^(\w+Error): ", "\n".join(outputs), re.MULTILINE)
    assert len(errors) == EXPECTED_ERRORS == source.count("show(lambda")
    assert set(errors) == {"CMPConfigError", "PartitionError", "FileNotFoundError"}
    assert "CMPConfigError: strategy='cmp' splits the model over several workers" in page


def _message_templates() -> list[str]:
    """Every string literal of the package, formatted values shown as NUL: the texts errors are made from."""
    templates = []
    for path in (DOCS.parent / "lightning_cmp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                templates.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                parts = [v.value if isinstance(v, ast.Constant) else "\0" for v in node.values]
                templates.append("".join(str(p) for p in parts))
    return templates


def test_troubleshooting_quotes_the_library_messages() -> None:
    """An *italic quote* is message text: each part between ``...`` appears in one of the library's strings."""
    text = (DOCS / "troubleshooting.md").read_text()
    quotes = [" ".join(q.split()) for q in re.findall(r"(?<![*\w])\*(?!\*)([^*]+?)\*(?![*\w])", text)]
    assert len(quotes) >= 10
    templates = _message_templates()
    for quote in quotes:
        for part in filter(None, (p.strip() for p in quote.split("..."))):
            assert any(part in t for t in templates), f"troubleshooting.md: {part!r} of {quote!r} is not in the code"


LAUNCHING = [(page, code) for page in TUTORIALS for code, reason in python_blocks(page) if reason is None]
LAUNCHING = [(page, code) for page, code in LAUNCHING if _launches_workers(code)]


@pytest.mark.slow
@pytest.mark.parametrize("page,code", LAUNCHING, ids=[page for page, _ in LAUNCHING])
def test_tutorial_multiprocess_blocks_run_as_scripts(page: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "tutorial.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


class _BuildOnly(CMPCLI):
    """Parses the command and builds its model, data and Trainer (strategy included); runs nothing.

    LightningCLI calls the CLI's own method named after the subcommand when there is one.
    """

    ran = ""

    def fit(self, **kwargs: Any) -> None:
        self.ran += "fit"

    def validate(self, **kwargs: Any) -> None:
        self.ran += "validate"

    def test(self, **kwargs: Any) -> None:
        self.ran += "test"

    def predict(self, **kwargs: Any) -> None:
        self.ran += "predict"


COMMANDS = [(page, command) for page in TUTORIALS for command in commands(page)]


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_commands_build_in_process(
    page: str, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every documented command, in process: ``--print_config`` runs as written; the others build everything."""
    monkeypatch.chdir(workdir())
    args = _cli_args(command)
    if "--print_config" in args:
        with pytest.raises(SystemExit) as exited:
            make_cli(args)
        assert exited.value.code in (0, None) and "trainer:" in capsys.readouterr().out
        return
    cli = make_cli(args, cli_class=_BuildOnly)
    assert isinstance(cli, _BuildOnly) and cli.ran == args[0] and cli.trainer is not None


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    rest = iter(long)
    return all(line in rest for line in short)


def _runnable() -> list[tuple[str, list[str]]]:
    """Pages with commands to run, less a page whose commands another page runs too, in the same order.

    index.md repeats recipes.md's ``fit`` then ``test`` word for word; running recipes.md's sequence runs those
    command lines as written, so running them a second time (~35 s) would test nothing new.
    """
    found = {page: commands(page, run=True) for page in TUTORIALS}
    return [
        (page, lines)
        for page, lines in found.items()
        if lines
        and not any(
            other != page and len(more) > len(lines) and _is_subsequence(lines, more) for other, more in found.items()
        )
    ]


RUNNABLE = _runnable()


def test_runnable_pages_cover_every_command() -> None:
    ran = {line for _, lines in RUNNABLE for line in lines}
    assert all(set(commands(page, run=True)) <= ran for page in TUTORIALS)
    assert [page for page, _ in RUNNABLE] == ["recipes.md"]  # index.md's two commands are a part of it


@pytest.mark.slow
@pytest.mark.parametrize("page,found", RUNNABLE, ids=[page for page, _ in RUNNABLE])
def test_commands_run_as_written(page: str, found: list[str]) -> None:
    """Each command runs in its own processes with ``TINY_RUN`` appended (2 steps, 32 images), in page order."""
    for command in found:
        run_command(command)
    if page == "recipes.md":
        assert (workdir() / "predictions.csv").is_file()


def test_every_tutorial_page_is_in_the_nav() -> None:
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    for page in TUTORIALS:
        assert f": {page}" in nav, f"{page} is missing from the nav of mkdocs.yml"


PUBLIC = [
    "lightning_cmp",
    "lightning_cmp.data",
    "lightning_cmp.models",
    "lightning_cmp.cli",
    "lightning_cmp.callbacks",
    "lightning_cmp.partition",
    "lightning_cmp.schedule",
    "lightning_cmp.runtime",
    "lightning_cmp.checkpoint_io",
]


@pytest.mark.parametrize("package", PUBLIC)
def test_api_reference_lists_every_public_name(package: str) -> None:
    api = (DOCS / "api.md").read_text()
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if f"::: {package}.{name}\n" not in api]
    assert not missing, f"add to docs/api.md: {', '.join(f'::: {package}.{n}' for n in missing)}"


def test_timetables_are_rendered_by_the_schedule_layer() -> None:
    page = _load_hooks().on_page_markdown((DOCS / "how-cmp-works.md").read_text())
    assert "<!--" not in page, "a marker was not expanded"
    assert page.count('```text title="cmp, num_stages=') == 4 and "rank 3:" in page
    assert page.count('```text title="cmp, num_stages=4, num_microbatches=4"') == 1
    assert page.count('```text title="gpipe, num_stages=2, num_microbatches=4"') == 1
    assert "| `cmp` | 3.00 |" in page and "| `cmp` (num_microbatches=4) | 3.00 |" in page


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path)]
    done = subprocess.run(build, cwd=DOCS.parent, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    api = re.sub(r"<pre.*?</pre>|<[^>]+>", "", (tmp_path / "api" / "index.html").read_text(), flags=re.DOTALL)
    for leftover in (":class:", ":meth:", ":func:", "::", "]["):
        assert leftover not in api, f"the API reference shows {leftover!r}: a docstring is not rendered"
    assert "splits the model over several workers" in (tmp_path / "troubleshooting" / "index.html").read_text()


#: CMPStrategy arguments every Lightning strategy has; the README's options table lists the others
_PLUMBING = {"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin"}
_PLUMBING |= {"process_group_backend", "start_method"}


def test_readme_points_to_the_docs_and_its_example_runs() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    assert "[docs/index.md](docs/index.md)" in readme and "mkdocs serve" in readme
    code = next(code for lang, code, _ in _fenced(readme) if lang == "python")
    assert len([line for line in code.splitlines() if line.strip()]) <= 10, code
    exec(compile(_without_trainer(code), "README.md", "exec"), {"__name__": "readme"})
    options = set(inspect.signature(lightning_cmp.CMPStrategy.__init__).parameters) - _PLUMBING - {"self"}
    missing = [name for name in sorted(options) if f"| `{name}` " not in readme]
    assert not missing, f"README.md: add {missing} to the options table"
    for name in SCHEDULES:
        assert f"| `{name}` " in readme, f"README.md: add the strategy {name!r} to the table"


def test_readme_results_come_from_the_saved_json() -> None:
    """The README's results table quotes docs/bench/time_to_accuracy.json: every number in it is in the file."""
    from lightning_cmp.bench.time_to_accuracy import time_to_accuracy

    readme = (DOCS.parent / "README.md").read_text()
    record = json.loads((DOCS / "bench" / "time_to_accuracy.json").read_text())
    target, rows = time_to_accuracy(record)
    assert f"seconds to {100 * target:.2f} % validation accuracy" in readme
    reached = {row["label"]: row for row in rows}
    rows_of = {"single device": "| single device", "ddp": "| Lightning `ddp`", "mp": '| `strategy="mp"`'}
    rows_of["cmp (gradient)"] = '| `strategy="cmp"`'
    results = readme.split("<!-- results -->", 1)[1].split("## ", 1)[0]
    for run in record["runs"]:
        line = next(line for line in results.splitlines() if line.startswith(rows_of[run["label"]]))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{run['processes']} x {run['threads']}", (run["label"], cells)
        assert cells[2] == f"{run['samples_per_s']:.1f}", (run["label"], cells)
        assert cells[3] == f"{reached[run['label']]['seconds']:.1f}", (run["label"], cells)
        assert cells[4] == f"{100 * run['test_acc']:.2f} %", (run["label"], cells)
