import subprocess
import sys


def test_scheduler_imports_neither_torch_nor_ray():
    code = (
        "import sys, scheduler, scheduler.block_manager, scheduler.scheduler, scheduler.sequence\n"
        "import scheduler.routing, scheduler.prefix_index, scheduler.step_time\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, f'scheduler imported {heavy}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_serve_app_builder_imports_no_torch():
    """Serve imports cluster.app to build the application (and the CLI to validate configs):
    keeping torch and transformers out of it keeps startup fast."""
    code = (
        "import sys, cluster.app, cluster.cli\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, f'cluster.app imported {heavy}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dependencies_point_one_way():
    """cluster -> replicas -> scheduler: no module imports a package to its left."""
    import ast
    from pathlib import Path

    forbidden = {"scheduler": {"replicas", "cluster"}, "replicas": {"cluster"}}
    root = Path(__file__).parent.parent
    wrong = []
    for package, banned in forbidden.items():
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                wrong += [
                    f"{path.relative_to(root)} imports {n}"
                    for n in names
                    if n.split(".")[0] in banned
                ]
    assert not wrong, f"a dependency points the wrong way: {wrong}"
