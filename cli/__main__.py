"""``python -m vblk.cli``: the same as the ``vblk`` console script."""
from vblk.cli.app import main

if __name__ == "__main__":
    main()
