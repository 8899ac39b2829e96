"""``python -m cli``: the same as the ``vblk`` console script."""
from cli.app import main

if __name__ == "__main__":
    main()
