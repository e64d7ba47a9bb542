"""The package's shape: entry points are leaves nothing imports, no import cycles, short functions,
and the configs ship inside the package (a non-editable install runs from any directory)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"rlcm_exp": ROOT / "src" / "rlcm_exp", "benchmarks": ROOT / "benchmarks"}
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for package, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            parts = (package, *f.relative_to(folder).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = (f, ast.parse(f.read_text()))
    return out


def is_entry_point(name: str, tree: ast.Module) -> bool:
    """`__main__` modules, modules run as scripts and Hydra mains: what a user runs, never imported."""
    if name.endswith("__main__"):
        return True
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "__name__":
            return True
        decorators = getattr(node, "decorator_list", [])
        if any("hydra.main" in ast.unparse(d) for d in decorators):
            return True
    return False


def imports(name: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of ours imported by `name`, lazily (inside functions) or not, TYPE_CHECKING included."""
    found = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> tuple[dict[str, set[str]], set[str]]:
    mods = modules()
    known = set(mods)
    edges = {m: imports(m, path, tree, known) for m, (path, tree) in mods.items()}
    entries = {m for m, (_, tree) in mods.items() if is_entry_point(m, tree)}
    return edges, entries


def test_no_module_imports_an_entry_point() -> None:
    edges, entries = graph()
    offenders = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if t in entries)
    assert not offenders, f"entry points must be leaves: {offenders}"
    assert {"rlcm_exp.__main__", "rlcm_exp.sample", "rlcm_exp.evaluate", "rlcm_exp.export"} <= entries


def test_no_import_cycle() -> None:
    edges, _ = graph()
    # a package importing its own submodules (re-exports in __init__) is not a cycle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(path[path.index(t) :] + [t] if t in path else [m, t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles[:3]}"


# The direction table (../shared/design.md, "Layers"): a library module imports only modules of a
# strictly lower layer (layer 0's leaves may also import each other); the commands sit on top.
# Plug-ins (toy world, reproduction programme, reward server, run reading) use the library's
# extension points: they may import any library layer and each other, and no library layer imports
# them. Every top-level module or package of rlcm_exp must be listed: a new one is placed on purpose.
LAYERS = {
    "errors": 0, "configs": 0, "secrets": 0, "provenance": 0, "validation": 0, "tokenizer": 0, "prompts": 0,
    "models": 1, "rl": 1,
    "policies": 2, "rewards": 2,
    "tracking": 3,
    "evaluation": 4,
    "training": 5,
}  # fmt: skip
COMMANDS = {"__main__", "sample", "evaluate", "export", "compare", "reproduce", "reward_server", "api"}
PLUGINS = {"toy", "reproduction", "serving", "analysis"}


def unit(module: str) -> str:
    """rlcm_exp.training.trainer -> training; rlcm_exp -> __init__ (the package's re-exports)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def direction_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in edges.items():
        if not source.startswith("rlcm_exp") or unit(source) in ("__init__", "conf"):
            continue
        a = unit(source)
        for target in targets:
            b = unit(target)
            if not target.startswith("rlcm_exp") or a == b or b == "__init__" or a in COMMANDS:
                continue
            if b in COMMANDS:
                bad.append(f"{source} -> {target} (a command)")
            elif a in PLUGINS:
                continue
            elif b in PLUGINS:
                bad.append(f"{source} -> {target} (the library imports a plug-in)")
            elif not (LAYERS[b] < LAYERS[a] or LAYERS[a] == LAYERS[b] == 0):
                bad.append(f"{source} -> {target} (layer {LAYERS[a]} imports layer {LAYERS[b]})")
    return sorted(bad)


def test_every_top_level_module_has_a_place_in_the_direction_table() -> None:
    units = {unit(m) for m in modules() if m.startswith("rlcm_exp")} - {"__init__", "conf"}
    unplaced = units - set(LAYERS) - COMMANDS - PLUGINS
    assert not unplaced, f"place these in LAYERS, COMMANDS or PLUGINS: {sorted(unplaced)}"


def test_no_import_against_the_direction_table() -> None:
    edges, _ = graph()
    assert not direction_violations(edges), direction_violations(edges)


def test_the_direction_table_catches_each_kind_of_violation() -> None:
    edges = {
        "rlcm_exp.evaluation.suite": {"rlcm_exp.training.build"},  # upwards
        "rlcm_exp.models.family": {"rlcm_exp.toy.family"},  # the library into a plug-in
        "rlcm_exp.training.trainer": {"rlcm_exp.sample"},  # into a command
        "rlcm_exp.policies.lcm": {"rlcm_exp.rewards.base"},  # sideways between layer-2 packages
        "rlcm_exp.toy.reward": {"rlcm_exp.rewards.base", "rlcm_exp.analysis.runs"},  # a plug-in: fine
        "rlcm_exp.api": {"rlcm_exp.training.build"},  # a command: fine
    }
    found = direction_violations(edges)
    assert len(found) == 4 and all(s.split(" ")[0] in str(found) for s in list(edges)[:4]), found


def test_no_function_over_80_lines() -> None:
    long = []
    for name, (_, tree) in modules().items():
        if not name.startswith("rlcm_exp"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_configs_are_found_through_the_package() -> None:
    from rlcm_exp.configs import compose, conf_dir

    assert (conf_dir() / "config.yaml").is_file()
    assert compose(overrides=["model=tiny"]).train.samples_per_epoch == 8


@pytest.mark.subprocess
def test_non_editable_install_runs_from_any_directory(tmp_path: Path) -> None:
    """`pip install .` (a wheel, not editable) into a fresh venv that borrows this environment's
    dependencies; then `rlcm-exp` and `python -m rlcm_exp` train a tiny run from another folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the dependencies come from this environment (a .pth line adds its site-packages, whose own
    # .pth files, the editable finder of this checkout among them, are not run from there)
    Path(site, "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    build = tmp_path / "build"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(build),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    wheel = next(build.glob("rlcm_exp-*.whl"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "RLCM_EXP_CACHE": str(tmp_path / "cache"),
    }
    # without PYTHONPATH, pip too: with PYTHONPATH=src it saw the wheel build's src/rlcm_exp.egg-info
    # as an installed rlcm_exp and skipped the install
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, cwd=tmp_path, env=env
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(py), "-c", "import rlcm_exp; print(rlcm_exp.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
    ).stdout
    assert str(venv) in where, f"rlcm_exp imported from {where}, not the fresh install"
    overrides = ["model=tiny", "task=compression", "train.epochs=1"]
    for i, cmd in enumerate([[str(venv / "bin" / "rlcm-exp")], [str(py), "-m", "rlcm_exp"]]):
        run_dir = elsewhere / f"run{i}"
        res = subprocess.run(
            [*cmd, *overrides, f"hydra.run.dir={run_dir}"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "checkpoints" / "final").is_dir()


# What these plug-ins may import of ours (issue 27), narrower than the direction table: analysis reads
# any run and knows no paper or algorithm (its RunSummary is a training callback, so it sees the
# Callback base); the paper's reproduction and studies sit above it (the toy detector is a plug-in).
MAY_IMPORT = {
    "rlcm_exp.analysis": (
        *("rlcm_exp.analysis", "rlcm_exp.tracking", "rlcm_exp.errors", "rlcm_exp.configs"),
        "rlcm_exp.training.callbacks",
    ),
    "rlcm_exp.reproduction": (
        *("rlcm_exp.reproduction", "rlcm_exp.analysis", "rlcm_exp.configs", "rlcm_exp.errors"),
        *("rlcm_exp.evaluation", "rlcm_exp.toy", "rlcm_exp.provenance"),
    ),
}


def test_analysis_and_reproduction_import_only_what_they_may() -> None:
    edges, _ = graph()
    bad = [
        f"{m} -> {t}"
        for m, targets in edges.items()
        for package, allowed in MAY_IMPORT.items()
        if m == package or m.startswith(package + ".")
        for t in targets
        if not any(t == a or t.startswith(a + ".") for a in allowed)
    ]
    assert not bad, bad


def test_the_readme_layout_matches_the_tree() -> None:
    """README's "Where things are": every package folder of src/rlcm_exp is there, and every file it
    names exists."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Where things are")
    section = readme[start : readme.index("Rules the layout keeps", start)]
    package = ROOT / "src" / "rlcm_exp"
    folders = [d.name for d in package.iterdir() if d.is_dir() and d.name not in ("conf", "__pycache__")]
    assert [d for d in folders if f"{d}/" not in section] == []
    existing = {f.name for f in ROOT.rglob("*.py") if ".venv" not in f.parts}
    assert sorted(n for n in set(re.findall(r"\b(\w+\.py)\b", section)) if n not in existing) == []
