"""`python -m genloom.cli`: the `genloom` command, as the console script runs it."""

from genloom.cli import main

if __name__ == "__main__":
    main()
