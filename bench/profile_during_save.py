"""The JAX profiler beside orbax's asynchronous save: how many processes crash (SIGSEGV).

Why `JaxTrainer.start_profile` and `stop_profile` wait for a pending checkpoint save: a fresh-clone
CI run died with SIGSEGV as profiled step 5 began while step 4's save was in flight. Each process here
puts 20 float32 256 x 256 arrays on 8 CPU devices (mesh 4 x 2), then runs --cycles cycles of one
of two orders, with or without `CheckpointManager.wait_until_finished()` (the trainer's fix) where
the marker is:
- save, start: save (async); [wait]; start_trace; two steps; stop_trace: the trainer's profile
  window opening right after a checkpoint step;
- start, save, stop: start_trace; a step; save (async); a step; [wait]; stop_trace: a checkpoint step
  inside the profile window.
A process that exits with a signal crashed. Writes bench/results/profile_during_save.json and prints
a table.

    python bench/profile_during_save.py [--processes 30] [--cycles 30] [--wait-processes 10]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp

order, wait, cycles, root = sys.argv[1], sys.argv[2] == "wait", int(sys.argv[3]), sys.argv[4]
mesh = jax.make_mesh((4, 2), ("a", "b"))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
state = {f"w{i}": jax.device_put(jnp.full((256, 256), float(i)), sharding) for i in range(20)}
step = jax.jit(lambda s: jax.tree.map(lambda x: x * 1.0001 + 1, s))
manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
    max_to_keep=2, enable_async_checkpointing=True))
trace = os.path.join(root, "profile")
for i in range(cycles):
    state = step(state)
    if order == "save-start":
        manager.save(i, args=ocp.args.StandardSave(state))
        if wait:
            manager.wait_until_finished()
        jax.profiler.start_trace(trace, create_perfetto_trace=True)
        state = step(step(state))
    else:
        jax.profiler.start_trace(trace, create_perfetto_trace=True)
        state = step(state)
        manager.save(i, args=ocp.args.StandardSave(state))
        state = step(state)
        if wait:
            manager.wait_until_finished()
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
manager.wait_until_finished()
manager.close()
"""


def trial(order: str, wait: bool, cycles: int) -> int:
    """The child's exit status (negative: killed by that signal)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as root:
        return subprocess.run([sys.executable, "-c", CHILD, order, "wait" if wait else "no-wait",
                               str(cycles), root], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=600).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=30, help="processes per row without the wait")
    parser.add_argument("--wait-processes", type=int, default=10,
                        help="processes per row with the wait (slower: the trace spans the save)")
    parser.add_argument("--cycles", type=int, default=30, help="save/trace cycles per process")
    args = parser.parse_args()
    import jax
    import orbax.checkpoint

    rows = []
    for order in ("save-start", "start-save-stop"):
        for wait in (False, True):
            began = time.perf_counter()
            codes = [trial(order, wait, args.cycles)
                     for _ in range(args.wait_processes if wait else args.processes)]
            rows.append({"order": order, "wait_for_save": wait, "processes": len(codes),
                         "cycles_per_process": args.cycles,
                         "crashed": sum(c < 0 for c in codes),
                         "failed_otherwise": sum(c > 0 for c in codes),
                         "signals": sorted({-c for c in codes if c < 0}),
                         "seconds": round(time.perf_counter() - began, 1)})
    result = {"benchmark": "profile_during_save", "command": "python bench/profile_during_save.py "
              + " ".join(sys.argv[1:]), "jax": jax.__version__, "orbax": orbax.checkpoint.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, 8 CPU devices", "rows": rows}
    out = REPO / "bench" / "results" / "profile_during_save.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'order':<16} {'wait':<5} {'crashed':>12} {'seconds':>8}")
    for r in rows:
        print(f"{r['order']:<16} {str(r['wait_for_save']):<5} "
              f"{r['crashed']:>4} / {r['processes']:<5} {r['seconds']:>8}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
