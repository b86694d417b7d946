"""Print the `uv pip install` options that reproduce this machine's pip configuration (`pip config list`):
its index URLs, find-links folders and constraint files, with pip's rule of taking the best version across all
indexes. `make venv` installs the package with uv (seconds, where pip took minutes) and falls back to pip."""

from __future__ import annotations

import shlex
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}


def main() -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    args, pairs = ["--index-strategy", "unsafe-best-match"], []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        flag = FLAGS.get(key.rsplit(".", 1)[-1])
        for item in shlex.split(value)[0].split() if flag else ():
            if (flag, item) not in pairs:
                pairs.append((flag, item))
    print(shlex.join(args + [part for pair in pairs for part in pair]))


if __name__ == "__main__":
    main()
