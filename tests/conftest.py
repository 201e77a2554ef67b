import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/references.py and other test helpers


# --- the `perf` marker (speed and memory checks, off by default) and the `cuda` marker (needs a GPU) -

def pytest_collection_modifyitems(config, items):
    """Skip every test marked ``perf`` unless ``-m`` names it (shared cores make timings and
    allocation counts swing); skip every test marked ``cuda`` when torch sees no CUDA device,
    saying so: skipped, never passed."""
    if "perf" not in (config.getoption("markexpr") or ""):
        for item in items:
            if item.get_closest_marker("perf") is not None:
                item.add_marker(pytest.mark.skip(reason="a speed or memory check: run with pytest -m perf"))
    cuda_tests = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA device; torch {torch.__version__} sees none here "
              f"(torch.cuda.is_available() is False; built with CUDA {torch.version.cuda})")
    for item in cuda_tests:
        item.add_marker(pytest.mark.skip(reason=reason))


# --- a throwaway PostgreSQL server (scripts/pg-throwaway.sh), for the scale-out tests -------------

_PG_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pg-throwaway.sh"


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the session: 127.0.0.1, its own data directory and port, trust
    authentication. Skips when there are no server binaries or no psycopg2; CI (.ci/run)
    installs the server. Yields the URL of its ``postgres`` database."""
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver (pip install -e '.[postgres]') is missing")
    # Under /tmp, not pytest's tmp folder: as root the server runs as the `postgres` user, which
    # cannot reach /tmp/pytest-of-root.
    folder = tempfile.mkdtemp(prefix="attnbench-pg-")
    started = subprocess.run(["bash", str(_PG_SCRIPT), "start", folder], capture_output=True, text=True)
    if started.returncode == 3:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"{started.stderr.strip()} (.ci/run installs them)")
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"scripts/pg-throwaway.sh start failed: {started.stdout}{started.stderr}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(_PG_SCRIPT), "stop", folder], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, EMPTY database on the session's server (no Optuna schema yet); dropped after."""
    import psycopg2

    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.replace("postgresql+psycopg2://", "postgresql://")
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


# --- variants registered in-process for one test ---------------------------------------------------

@pytest.fixture
def registered():
    """``registered(cls, name)`` registers a variant class in this process for one test and returns
    its name; every class registered so is removed after the test."""
    from attnbench import registry

    names = []

    def register(cls, name):
        registry.register_variant(cls, name=name)
        names.append(name)
        return name

    yield register
    for name in names:
        registry.unregister_variant(name)
