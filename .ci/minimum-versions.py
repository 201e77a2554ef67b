"""Print pip constraints pinning each dependency of pyproject.toml (the test extra included) to its
declared lower bound: ``optuna>=4.9`` -> ``optuna==4.9``. torch and torchvision are left out (the
minimum-versions environment reuses the installed wheels), and so are the build tool and the linter."""
import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch", "torchvision", "setuptools", "ruff"}

project = tomllib.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:>=\s*([^,;\s]+))?.*", requirement)
    name, lower = match.group(1), match.group(2)
    if name.lower() in SKIP:
        continue
    if lower is None:
        sys.exit(f"{requirement!r}: no lower bound declared")
    print(f"{name}=={lower}")
