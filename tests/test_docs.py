"""The documentation cannot drift from the code: the flag reference is generated from the parsers, every
command in the README and docs names a script that exists and flags it takes, the tables the tools write are
what their JSON gives, and every function docs/how_it_works.md names is one of the repository's."""
import ast
import glob
import importlib
import os
import re
import shlex

import pytest

import checkpoint
import config
import eval as eval_script
import inference
from conftest import REPO
from tools import bench, flags, results, samplers, sweep, tables, train_classifier, write_folder

pytestmark = pytest.mark.unit
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
PARSERS = {"train.py": lambda: config.build_parser(False), "train_conditional.py": lambda: config.build_parser(True),
           "inference.py": inference.build_parser, "eval.py": eval_script.build_parser,
           "checkpoint.py": checkpoint.build_parser, "tools.bench": bench.build_parser,
           "tools.sweep": sweep.build_parser, "tools.results": results.build_parser,
           "tools.samplers": samplers.build_parser, "tools.train_classifier": train_classifier.build_parser,
           "tools.write_folder": write_folder.build_parser,
           "tools.flags": None}
OTHERS = {"pytest", "venv", "-c"}  # python -m pytest, python3 -m venv, python -c "..."


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def commands(text: str):
    """(script, [flags]) of each `python SCRIPT ...` or `torchrun ... SCRIPT ...` in a text: the flags up to the
    end of the command (a backtick, a comment, a table cell or the line's end; a trailing backslash continues)."""
    text = text.replace("\\\n", " ")
    pattern = r"\bpython (?:-m )?(-c|[\w./]+)([^`#|\n]*)|\btorchrun [^`#|\n]*?(\w+\.py)([^`#|\n]*)"
    for match in re.finditer(pattern, text):
        script, rest = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        if not script.startswith("tools.") and script not in OTHERS:
            script = script.removesuffix(".py") + ".py"
        yield script, [token.split("=")[0] for token in shlex.split(rest, posix=False) if token.startswith("--")]


def test_flag_reference_is_current():
    assert read(flags.PATH) == flags.flags_reference(), "docs/flags.md is stale: run python -m tools.flags"


def test_every_command_in_the_docs_runs_a_real_script_with_its_own_flags():
    for path in DOCS:
        for script, named in commands(read(path)):
            if script in OTHERS:
                continue
            assert script in PARSERS, f"{os.path.basename(path)} runs {script}, which is not a script here"
            known = {"--help"} if PARSERS[script] is None else {
                name for action in PARSERS[script]()._actions for name in action.option_strings}
            assert set(named) <= known, f"{os.path.basename(path)}: {script} takes no {sorted(set(named) - known)}"


def test_the_command_reader_sees_what_a_doc_runs():
    """The reader above, on known answers: a comment, a table cell and a continued line."""
    text = ("python train.py --preset cpu  # --not_this\n| `python -m tools.sweep --only x` | --nor_this |\n"
            "torchrun --nproc_per_node 8 train.py \\\n  --batch_size 8\npython -c \"import x\"")
    assert list(commands(text)) == [("train.py", ["--preset"]), ("tools.sweep", ["--only"]),
                                    ("train.py", ["--batch_size"]), ("-c", [])]


@pytest.mark.parametrize("tool", [sweep, results, samplers])
def test_generated_tables_are_what_their_json_gives(tool, tmp_path):
    """Each tool's table, written again from its JSON alone, is the one in docs/."""
    default = tool.build_parser().get_default("table")
    _, rows = tables.load_rows(os.path.join(REPO, default))
    (tmp_path / "docs").mkdir()
    tool.write_table(rows, str(tmp_path / default), tables.machines(rows))
    assert read(str(tmp_path / default)) == read(os.path.join(REPO, default)), f"{default} is stale"


def code_references(text: str) -> list:
    """The `name()` and `Class.method()` a page names as the repository's code."""
    return re.findall(r"`([A-Za-z_][\w.]*)\(\)`", text)


def test_how_it_works_names_only_the_repositorys_functions():
    modules = [importlib.import_module(os.path.relpath(p, REPO)[:-3].replace(os.sep, "."))
               for p in glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tools", "*.py"))]

    def resolves(name: str) -> bool:
        for module in modules:
            target = module
            for part in name.split("."):
                target = getattr(target, part, None)
            if callable(target) and getattr(target, "__module__", "").split(".")[0] in {
                    m.__name__.split(".")[0] for m in modules}:
                return True
        return False
    names = code_references(read(os.path.join(REPO, "docs", "how_it_works.md")))
    assert len(set(names)) >= 25  # the page names its code
    assert [n for n in names if not resolves(n)] == []
    assert not resolves("torch.randn") and not resolves("Diffusion.no_such_method")  # the check can fail


def test_tables_name_the_machine_of_each_row(tmp_path):
    """A table rewritten elsewhere keeps its rows' machines: an older JSON names one for all its rows."""
    import json
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


def test_no_import_circle():
    """The modules at the root and in tools/ import each other without a circle, deferred imports included."""
    paths = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tools", "*.py"))
    names = {os.path.relpath(p, REPO)[:-3].replace(os.sep, "."): p for p in paths}
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(read(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = found & set(names)
    state, path = {}, []

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
    assert not any(dep.startswith("tools.") for module, deps in graph.items() if not module.startswith("tools.")
                   for dep in deps), "the product imports the tooling"
