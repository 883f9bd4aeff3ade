"""The lint rule of DESIGN.md: zoo/ops is pure jax.numpy, importable without Flax."""

import ast
import pathlib

OPS = pathlib.Path(__file__).resolve().parents[2] / "zoo" / "ops"


def test_ops_import_no_flax():
    offenders = []
    for path in sorted(OPS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(OPS)}: {n}" for n in names if n.split(".")[0] in ("flax", "zoo") and
                          not n.startswith(("zoo.ops", "zoo.errors"))]
    assert len(list(OPS.rglob("*.py"))) >= 8
    assert not offenders, offenders
