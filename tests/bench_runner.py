"""Runs `benchmarks/<name>.py --quick` for tests/test_benchmarks.py, each script in a process forked from this one,
which imported torch and DeepSpeed once: a dozen scripts no longer pay a dozen interpreter starts and imports
(about 3 s of CPU each here, 6 with DeepSpeed). Nothing runs in this process but imports, so it forks with no
threads and no OpenMP pool of its own.

Protocol: one JSON request per stdin line, {"script", "out", "err"}; one JSON reply per stdout line, {"code"}: the
script's exit status, its stdout and stderr in the files named."""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import traceback


def run_script(script: str, out: str, err: str) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: what it starts goes with it
        for fd, path in ((1, out), (2, err)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = [script, "--quick"]
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` sets it
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    replies = os.fdopen(os.dup(1), "w")  # the protocol's own channel: what imports print goes to stderr
    os.dup2(2, 1)
    importlib.import_module("torch")  # the forked scripts inherit it
    try:
        importlib.import_module("deepspeed")  # moe.py and ulysses.py compare against it
    except ImportError:
        pass
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps({"code": run_script(request["script"], request["out"], request["err"])}), file=replies,
              flush=True)


if __name__ == "__main__":
    main()
