"""``python -m embedsearch.cli``."""

from embedsearch.cli import main

if __name__ == "__main__":
    main()
