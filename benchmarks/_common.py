"""What the micro-benchmarks share: the median time and the memory peak of a step."""

import resource
import statistics
import time
from collections.abc import Callable

import torch


def measure_step(step: Callable[[], None], repeats: int, device: str, cpu_time: bool = False) -> tuple[float, float]:
    """
    Run `step` once to warm up (its memory peak is the one reported), then `repeats` times timed: wall time, or with
    `cpu_time` on a CPU the CPU time of this process (`time.process_time`; with one thread the step's own work, which
    other jobs on the machine change less). On CUDA always wall time.

    Returns:
        `tuple[float, float]`: the median seconds per step and the memory peak of one step in MiB above what was
        allocated before it: CUDA's allocator peak on a GPU, the growth of the process's maximum resident set on a CPU
        (so 0 when an earlier step already reached that peak).
    """
    cuda = device.startswith("cuda")
    clock = time.process_time if cpu_time and not cuda else time.perf_counter
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    if cuda:
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times), peak_mb
