"""python-worker: a background process written in Python, built with componentize-py.

Build it from the repository root with:

    componentize-py -d wit -w wasi:cli/command@0.2.12 componentize -p guest-examples/python-worker app -o python-worker.wasm

`python-worker [n]` prints `python tick {i} of {n} from {instance}` for i = 1..n (default 3),
then `run` returns: the instance exits with status 0. Arguments and environment are read
through `wasi:cli/environment` when `run` is called: the interpreter was initialised at build
time, so `sys.argv` and `os.environ` hold the build's values, not the instance's.
"""

from wit_world import exports
from wit_world.imports import environment


class Run(exports.Run):
    def run(self) -> None:
        args = environment.get_arguments()
        env = dict(environment.get_environment())
        n = int(args[1]) if len(args) > 1 else 3
        instance = env.get("WASMFORM_INSTANCE", "unknown")
        for i in range(1, n + 1):
            print(f"python tick {i} of {n} from {instance}", flush=True)
