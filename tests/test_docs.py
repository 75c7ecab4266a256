"""The documentation cannot drift from the code: the flag reference is generated from the parsers, every
flag the README names is one a script takes, and the README's layers are the modules' real imports."""
import ast
import glob
import json
import os
import re

import pytest

import config
import eval as eval_script
import inference
from conftest import REPO
from tools import bench, flags, results, samplers, sweep, tables

pytestmark = pytest.mark.unit


def read_readme() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_flag_reference_is_current():
    with open(flags.PATH) as f:
        assert f.read() == flags.flags_reference(), "docs/flags.md is stale: run python -m tools.flags"


def test_readme_names_only_real_flags():
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z_-]+", read_readme()))
    parsers = [config.build_parser(False), config.build_parser(True), inference.build_parser(), eval_script.build_parser(),
               sweep.build_parser(), bench.build_parser(), results.build_parser(), samplers.build_parser()]
    known = {name for p in parsers for action in p._actions for name in action.option_strings}
    tools = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint",
             "--logdir", "--no-deps", "--help"}  # torchrun's, tensorboard's, pip's
    assert named - known - tools == set()


def test_docs_run_only_scripts_that_exist():
    """`python X.py` names a file at the root, `python -m tools.X` a module in tools/: the docs follow a move."""
    for path in [os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md")):
        with open(path) as f:
            text = f.read()
        scripts = re.findall(r"python (?:-m )?([\w./]+?)(?:\.py)?(?=[\s`])", text)
        for script in set(scripts) - {"pytest", "-c", "venv"}:
            module = script.replace(".", "/") if "/" not in script else script
            assert os.path.isfile(os.path.join(REPO, module + ".py")), f"{os.path.basename(path)} runs {script}"


def test_tables_name_the_machine_of_each_row(tmp_path):
    """A table rewritten elsewhere keeps its rows' machines: an older JSON names one for all its rows."""
    table = tmp_path / "t.md"
    (tmp_path / "t.json").write_text(json.dumps(dict(machine="host A", rows=[{"x": 1}, {"x": 2, "machine": "host B"}])))
    _, rows = tables.load_rows(str(table))
    assert [r["machine"] for r in rows] == ["host A", "host B"]
    assert tables.machines(rows) == "host A and host B" and tables.machines(rows[:1]) == "host A"


@pytest.mark.parametrize("conditional", [False, True])
def test_preset_values_are_typed_and_known_flags(conditional):
    defaults, _ = config.parse_args([], conditional=conditional)
    for preset_name in config.PRESETS:
        preset = config.preset_values(preset_name, conditional)
        assert set(preset) <= set(vars(defaults))
        args, _ = config.parse_args(["--preset", preset_name], conditional=conditional)
        for name, value in preset.items():
            assert getattr(args, name) == value and type(getattr(args, name)) is type(value), name


# ----------------------------------------------------------------------------- the layers

def repository_modules() -> dict:
    """{module name: path} for the product at the root and the tooling in tools/."""
    paths = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tools", "*.py"))
    return {os.path.relpath(p, REPO)[:-3].replace(os.sep, "."): p for p in paths}


def imports(path: str, known) -> set:
    """The repository modules a file imports anywhere, deferred imports (inside functions) included."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found - {"tools"}


def import_graph() -> dict:
    modules = repository_modules()
    return {name: imports(path, modules) for name, path in modules.items()}


def test_no_import_circle():
    graph, state, path = import_graph(), {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_readme_layers_are_the_imports():
    """The README's layer table lists every module once, from the bottom up, and each imports only modules
    of lower rows or of its own; the product never imports the tooling."""
    rows = re.findall(r"^\| (\d) \| [^|]+ \| ([^|]+) \|$", read_readme(), flags=re.M)
    layer = {name.strip("` ").removesuffix(".py").replace("/", "."): int(n)
             for n, names in rows for name in names.split(",")}
    graph = import_graph()
    assert sorted(layer) == sorted(graph), "the README's layers name exactly the modules"
    for module, deps in graph.items():
        for dep in deps:
            assert layer[dep] <= layer[module], f"{module} (layer {layer[module]}) imports {dep} (layer {layer[dep]})"
            assert not (dep.startswith("tools.") and not module.startswith("tools.")), f"{module} imports {dep}"
