"""The package imports only downwards, and has no import cycle (imports inside functions count).

Layers, lowest first (docs/architecture.md draws them):
  core        flat vectors, client update, aggregators, server optimizers, staleness, protocols
  components  data, fleet, tasks, privacy, secure, algorithms, runs
  runtimes    sim (in-process, worker processes, fleet clock), network, the Runner
  experiment  config (reads the whole config) and experiment (builds a run from it)
  entry       api, cli, the package itself
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "flotilla"
LAYERS = [
    ("core", ["flotilla.core"]),
    (
        "components",
        [
            "flotilla.data",
            "flotilla.fleet",
            "flotilla.tasks",
            "flotilla.privacy",
            "flotilla.secure",
            "flotilla.algorithms",
            "flotilla.runs",
            "flotilla.blt",  # byte-level LM with entropy patching (issue 17)
            "flotilla.adapters",  # READ side network, LoRA, adapters, BitFit (issue 18)
            "flotilla.oov",  # personalised out-of-vocabulary adapter (issue 18)
            "flotilla.fairness",  # device tiers coupled to data, MDAC (issue 15)
            "flotilla.channels",  # upload/download compression with byte accounting (issue 19)
        ],
    ),
    ("runtimes", ["flotilla.sim", "flotilla.network", "flotilla.runner"]),
    # flotilla.tune runs whole experiments (trials) through flotilla.experiment
    ("experiment", ["flotilla.config", "flotilla.experiment", "flotilla.tune"]),
    # flotilla.network.cli is the command line of the network runtime (serve/join/status/certs): an entry point
    (
        "entry",
        ["flotilla.api", "flotilla.cli", "flotilla.client", "flotilla.network.cli", "flotilla.dashboard", "flotilla"],
    ),
]


def layer_of(module: str) -> int:
    best, rank = None, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best)):
                best, rank = p, i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return rank


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every flotilla module imported anywhere in the file (top level, functions, TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("flotilla")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.startswith("flotilla"):
                found.add(base)
                for a in node.names:  # `from flotilla.sim import sync` imports the module flotilla.sim.sync
                    if (ROOT.parent / (base + "." + a.name).replace(".", "/")).with_suffix(".py").exists():
                        found.add(f"{base}.{a.name}")
    return found - {name}


MODULES = {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def test_no_module_imports_from_a_layer_above_it():
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for m, deps in MODULES.items()
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(m)
    ]
    assert not upward, "imports against the layers:\n  " + "\n  ".join(upward)


def test_no_import_cycle():
    graph = {
        m: {d for d in deps if d in MODULES and not m.startswith(d + ".") and d != "flotilla"}
        for m, deps in MODULES.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = ROOT / "core" / "flat.py"
    tree_has_function_import = any(isinstance(n, ast.FunctionDef) for n in ast.walk(ast.parse(f.read_text())))
    assert tree_has_function_import
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from flotilla.api import train\n")
    found = set()
    for node in ast.walk(ast.parse(probe.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.add(node.module)
    assert "flotilla.api" in found
