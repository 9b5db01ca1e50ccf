"""Layers point one way: a room imports only rooms on its own floor or below (DESIGN.md)."""

import ast
from pathlib import Path

import lilliput

FLOOR = {"core": 1, "data": 1, "infer": 2, "eval": 3, "train": 4, "compress": 5, "export": 6, "jobs": 7,
         "serve": 7}


def imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):  # inside functions too
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "lilliput" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def test_no_room_imports_a_higher_one():
    root = Path(lilliput.__file__).parent
    wrong = []
    for path in root.rglob("*.py"):
        room = path.relative_to(root).parts[0]
        if room not in FLOOR:
            continue
        for other in imported_rooms(path):
            if other in ("cli", "demo") or FLOOR.get(other, 0) > FLOOR[room]:
                wrong.append(f"{path.relative_to(root)} imports lilliput.{other}")
    assert not wrong, wrong
