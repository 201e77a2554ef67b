"""Link torch and torchvision, with everything they need that attnbench does not declare itself,
from this environment's site-packages into the folder given: the minimum-versions environment
reads them from there (a .pth line) instead of installing several GB of wheels a second time.
Run with the Python of the environment that has torch installed."""
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

target = Path(sys.argv[1])
declared = {re.sub(r"[-_.]+", "-", name).lower() for name in sys.argv[2:]}   # installed at their minimum instead


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


todo, seen = [("torch", ()), ("torchvision", ())], set()
while todo:
    name, extras = todo.pop()
    name = key(name)
    if (name, extras) in seen or name in declared:
        continue
    seen.add((name, extras))
    dist = md.distribution(name)
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            todo.append((req.name, tuple(sorted(req.extras))))
    site = Path(dist.locate_file(""))
    for top in {Path(f).parts[0] for f in dist.files or ()}:
        if top == ".." or top == "__pycache__" or top.endswith(".pth"):
            continue
        link = target / top
        if not link.exists() and (site / top).exists():
            link.symlink_to(site / top)
print(f"linked {len({n for n, _ in seen})} distributions: {', '.join(sorted({n for n, _ in seen}))}")
