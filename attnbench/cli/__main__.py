"""``python -m attnbench.cli``: the ``attnbench`` command line (``sweep --workers`` starts its workers so)."""
from attnbench.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
