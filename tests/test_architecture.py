"""The package's shape: entry points are leaves nothing imports, no import cycles, short functions,
and the configs ship inside the package (a non-editable install runs from any directory)."""

from __future__ import annotations

import ast
import os
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
