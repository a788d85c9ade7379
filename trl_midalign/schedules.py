"""The training schedules: which loss each training micro-batch computes.

The trainer counts training micro-batches (`align_micro_step`, saved in checkpoints); a schedule maps that count to a
task step, an alignment step, or both.
"""

from typing import Literal, get_args


Schedule = Literal["alternate", "joint", "alignment_only"]
"""`"alternate"`: task and alignment micro-batches alternate, task first (the paper); `"joint"`: both losses on every
micro-batch; `"alignment_only"`: the alignment loss alone."""
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def is_task_step(schedule: Schedule, micro_step: int) -> bool:
    """Whether training micro-batch number `micro_step` (counted from 0) computes the task loss."""
    return schedule == "joint" or (schedule == "alternate" and micro_step % 2 == 0)


def is_alignment_step(schedule: Schedule, micro_step: int) -> bool:
    """Whether training micro-batch number `micro_step` (counted from 0) computes the alignment loss."""
    return schedule != "alternate" or micro_step % 2 == 1
