"""How often a 2-process Gloo run aborts at exit, with and without the recipes' end-of-run pause.

A process that ends right after a collective can abort in interpreter shutdown ("terminate called without an active
exception", exit code -6) although its work is done: Gloo's worker threads are still dropping the collective's objects
and need the GIL. Once in a CI run this failed a recipe launch under ZeRO-2. The recipes end with
`trl_midalign.scripts.end_processes`: a barrier, `destroy_process_group`, then a pause of `EXIT_PAUSE_SECONDS`.

This script launches a small pure-torch program many times with `torch.distributed.run` on CPU: it joins a Gloo group,
keeps a reference to the group (as DDP and DeepSpeed do), runs `all_gather_object`, destroys the group and ends, with
or without the pause, and counts the launches that did not exit cleanly.

    python benchmarks/exit_race.py                    # 50 launches per variant
    python benchmarks/exit_race.py --launches 100 --variants none pause
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time


PROGRAM = """
import os, sys, time
import torch.distributed as dist

variant, pause = sys.argv[1], float(sys.argv[2])
dist.init_process_group("gloo")
group = dist.group.WORLD  # held, as DDP and DeepSpeed hold their groups
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"rank": dist.get_rank(), "rows": list(range(1000))})
if "barrier" in variant:
    dist.barrier()
dist.destroy_process_group()
if "pause" in variant:
    time.sleep(pause)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=50, help="launches per variant")
    parser.add_argument(
        "--variants", nargs="+", default=["none", "barrier", "pause", "barrier+pause"], help="how each run ends"
    )
    parser.add_argument("--pause", type=float, default=None, help="seconds; default: recipes' EXIT_PAUSE_SECONDS")
    args = parser.parse_args()
    if args.pause is None:
        from trl_midalign.scripts import EXIT_PAUSE_SECONDS

        args.pause = EXIT_PAUSE_SECONDS

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        program = os.path.join(tmp, "end_after_gather.py")
        with open(program, "w") as f:
            f.write(PROGRAM)
        print(f"{'variant':<16}{'aborted':>10}{'launches':>10}{'seconds':>10}")
        for variant in args.variants:
            aborted, start = 0, time.perf_counter()
            for _ in range(args.launches):
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                done = subprocess.run(
                    [*command, program, variant, str(args.pause)], env=env, capture_output=True, text=True
                )
                aborted += done.returncode != 0
            print(f"{variant:<16}{aborted:>10}{args.launches:>10}{time.perf_counter() - start:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
