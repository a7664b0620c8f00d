"""Every module of split_alexnet/ (its sub-packages too) stays at most 400 lines: one module, one job."""
import os

LIMIT = 400
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "split_alexnet")


def test_modules_at_most_400_lines():
    over = {}
    for folder, _, names in os.walk(ROOT):
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                n = sum(1 for _ in f)
            if n > LIMIT:
                over[os.path.relpath(path, ROOT)] = n
    assert not over, f"modules over {LIMIT} lines (split them by job): {over}"
    assert len([1 for _, _, ns in os.walk(ROOT) for n in ns if n.endswith(".py")]) > 30   # it saw the package
