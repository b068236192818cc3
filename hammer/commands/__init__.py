"""The `hammer` commands' command-line code, one module a command (`hammer/cli.py` dispatches).

Each module defines `register(subparsers)`, which adds the command's parser (with an example in its
epilog) and sets `func`; the work itself lives in the modules the command names.
"""
