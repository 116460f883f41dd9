"""Check the import layering: ``agent → protocols ← controller``.

``agent`` and ``controller`` never import each other; ``protocols`` imports neither and stays pure (stdlib and
``cryptography`` only). Run by ``make check``; exits non-zero and names each offending import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "agent": {"controller"},
    "controller": {"agent"},
    "protocols": {"agent", "controller"},
}
PROTOCOLS_ALLOWED_THIRD_PARTY = {"cryptography"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module name imported by ``path`` with its line number."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(root: Path = ROOT) -> list[str]:
    """Human-readable lines, one per forbidden import."""
    stdlib = set(sys.stdlib_module_names)
    problems: list[str] = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            for lineno, module in imported_modules(path):
                top = module.split(".")[0]
                where = f"{path.relative_to(root)}:{lineno}"
                if top in forbidden:
                    problems.append(f"{where}: {package} must not import {module}")
                elif package == "protocols" and top not in stdlib | PROTOCOLS_ALLOWED_THIRD_PARTY | {"protocols"}:
                    problems.append(f"{where}: protocols must stay pure, but imports {module}")
    return problems


def main() -> int:
    problems = violations()
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} layering violation(s)")
        return 1
    print("layering ok: agent -> protocols <- controller")
    return 0


if __name__ == "__main__":
    sys.exit(main())
