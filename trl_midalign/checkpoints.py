"""Checkpoint integrity for [`AlignmentTrainer`]: what a checkpoint records, when it is intact, how a run resumes.

A checkpoint of `AlignmentTrainer` is a `Trainer` checkpoint plus `alignment_state.json` (the aligned layer, the
schedule and its phase), written last and atomically: a checkpoint with this file is complete. Before a checkpoint is
written, the trainable weights are checked to be finite. Resuming checks the checkpoint and the run's settings, and a
broken checkpoint is answered with the newest intact one of its folder.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any

import torch
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ._logging import get_logger


logger = get_logger(__name__)

STATE_FILE = "alignment_state.json"
_STATE_KEYS = {"align_micro_step": int, "align_layer": int}
_CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_folders(folder: str) -> list[str]:
    """The `checkpoint-<step>` folders of `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in os.listdir(folder):
        match = _CHECKPOINT_PATTERN.match(entry)
        if match and os.path.isdir(os.path.join(folder, entry)):
            found.append((int(match.group(1)), os.path.join(folder, entry)))
    return [path for _, path in sorted(found)]


def read_alignment_state(checkpoint: str) -> dict[str, Any]:
    """Read a checkpoint's `alignment_state.json`, raising a `ValueError` that names the file for a broken one."""
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}): the file was cut short or corrupted, so the phase of the alignment "
            "schedule cannot be restored from this checkpoint."
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(state).__name__}, not the JSON object AlignmentTrainer writes.")
    for key, kind in _STATE_KEYS.items():
        if key not in state:
            raise ValueError(f"{path} has no {key!r} (its keys: {sorted(state)}): the file is incomplete.")
        if isinstance(state[key], bool) or not isinstance(state[key], kind) or state[key] < 0:
            raise ValueError(f"{path}: {key!r} must be a non-negative int, got {state[key]!r}.")
    if not isinstance(state.get("align_schedule", ""), str):
        raise ValueError(f"{path}: 'align_schedule' must be a string, got {state['align_schedule']!r}.")
    return state


def write_alignment_state(checkpoint: str, state: dict[str, Any]) -> None:
    """
    Write `state` as the checkpoint's `alignment_state.json` through a temporary file and `os.replace`, so that the
    file is never left half-written.
    """
    path = os.path.join(checkpoint, STATE_FILE)
    handle, temporary = tempfile.mkstemp(dir=checkpoint, prefix=f".{STATE_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def checkpoint_problem(checkpoint: str) -> tuple[type[Exception], str] | None:
    """What keeps `checkpoint` from being resumed, as (exception type, explanation), or `None` if it is intact."""
    if not os.path.exists(checkpoint):
        return FileNotFoundError, f"{checkpoint} does not exist"
    if not os.path.isdir(checkpoint):
        return FileNotFoundError, f"{checkpoint} is a file, not a checkpoint folder"
    if not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
        return FileNotFoundError, (
            f"{checkpoint} has no {TRAINER_STATE_NAME}: the checkpoint was cut short while being written (process "
            "killed, disk full), or it is not a Trainer checkpoint"
        )
    if not os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
        return FileNotFoundError, (
            f"{checkpoint} has no {STATE_FILE}, the last file AlignmentTrainer writes into a checkpoint: it was cut "
            "short while being written (process killed, disk full), or it was written by another trainer (such as "
            "SFTTrainer), whose checkpoints do not record the phase of the alignment schedule"
        )
    try:
        read_alignment_state(checkpoint)
    except ValueError as error:
        return ValueError, str(error).rstrip(".")
    return None


def newest_intact_checkpoint(folder: str) -> str | None:
    """The newest checkpoint of `folder` that has its trainer state and a valid alignment state."""
    for checkpoint in reversed(checkpoint_folders(folder)):
        if checkpoint_problem(checkpoint) is None:
            return checkpoint
    return None


def resume_advice(folder: str) -> str:
    """Name the newest intact checkpoint of `folder`, or say that there is none."""
    intact = newest_intact_checkpoint(folder)
    if intact is not None:
        return (
            f"The newest intact checkpoint in {folder} is {intact}: resume from it with "
            f"resume_from_checkpoint={intact!r} (or delete the broken checkpoint folders and pass "
            "resume_from_checkpoint=True)."
        )
    return (
        f"There is no intact checkpoint (one with {TRAINER_STATE_NAME} and a valid {STATE_FILE}) in {folder}: start "
        "the run again without resume_from_checkpoint."
    )


def check_weights_are_finite(model: nn.Module, step: int, output_dir: str) -> None:
    """Refuse to write the checkpoint of `step` when a trainable weight holds NaN or inf (an update that diverged)."""
    names, sums = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or not parameter.is_floating_point():
            continue
        data = parameter.detach()
        data = data.to_local() if hasattr(data, "to_local") else data  # the local shard of an FSDP2 DTensor
        if data.numel():  # DeepSpeed ZeRO-3 leaves partitioned parameters empty
            names.append(name)
            sums.append(data.sum(dtype=torch.float32))  # NaN or inf anywhere makes the sum non-finite
    bad = [name for name, total in zip(names, sums) if not torch.isfinite(total).item()]
    if bad:
        raise FloatingPointError(
            f"{len(bad)} trainable parameter(s) hold NaN or inf after global step {step} (for example "
            f"{bad[:3]}): {PREFIX_CHECKPOINT_DIR}-{step} is not written, so that no checkpoint holds broken "
            "weights. The update diverged: lower learning_rate, keep max_grad_norm > 0, or train in bf16 rather "
            "than fp16. " + resume_advice(output_dir)
        )


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """
    The checkpoint folder a run resumes from, or `None` for a fresh run. `True` (also the strings `"true"`, as a
    command line or a YAML file may pass it) is the newest checkpoint of `output_dir`, refused when there is none.
    """
    checkpoint = resume_from_checkpoint
    if isinstance(checkpoint, str) and checkpoint.strip().lower() in ("true", "false", "none", ""):
        checkpoint = checkpoint.strip().lower() == "true"
    if checkpoint is True:
        found = checkpoint_folders(output_dir)
        if not found:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True, but output_dir {output_dir} holds no {PREFIX_CHECKPOINT_DIR}-* folder "
                "to resume from. Start the run without resume_from_checkpoint, or pass the path of a checkpoint."
            )
        return found[-1]
    return checkpoint if isinstance(checkpoint, str) else None


def restore_alignment_state(checkpoint: str, output_dir: str, align_layer: int, align_schedule: str) -> int:
    """
    Check that `checkpoint` is intact and was trained with this run's layer and schedule; return the phase of the
    schedule it recorded (`align_micro_step`).
    """
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        error, explanation = problem
        folder = os.path.dirname(os.path.normpath(checkpoint)) or "."
        advice = resume_advice(folder)
        if os.path.abspath(folder) != os.path.abspath(output_dir):
            advice += " " + resume_advice(output_dir)
        raise error(f"Cannot resume from {checkpoint}: {explanation}. {advice}")
    state = read_alignment_state(checkpoint)
    if state["align_layer"] != align_layer:
        raise ValueError(
            f"{checkpoint} was trained with align_layer={state['align_layer']}, but this run aligns layer "
            f"{align_layer}; set align_layer={state['align_layer']} to resume it."
        )
    schedule = state.get("align_schedule")
    if schedule is None:
        logger.warning(
            f"{os.path.join(checkpoint, STATE_FILE)} does not record align_schedule (it was written by an older "
            f"trl-midalign): resuming with align_schedule={align_schedule!r}, which must be the one it was trained "
            "with."
        )
    elif schedule != align_schedule:
        raise ValueError(
            f"{checkpoint} was trained with align_schedule={schedule!r}, but this run uses "
            f"align_schedule={align_schedule!r}; set align_schedule={schedule!r} to resume it (or start a new run, in "
            "a new output_dir, to change the schedule)."
        )
    return state["align_micro_step"]


def warn_about_earlier_checkpoints(output_dir: str, save_total_limit: int | None) -> None:
    """Warn before a fresh run writes into an `output_dir` that already holds another run's checkpoints."""
    found = checkpoint_folders(output_dir)
    if not found:
        return
    names = ", ".join(os.path.basename(path) for path in found[:3]) + (", ..." if len(found) > 3 else "")
    rotation = (
        f" With save_total_limit={save_total_limit}, transformers' checkpoint rotation deletes the oldest checkpoints "
        "of the folder, which are these."
        if save_total_limit
        else ""
    )
    logger.warning(
        f"output_dir {output_dir} already holds {len(found)} checkpoint folder(s) of an earlier run ({names}), and "
        "resume_from_checkpoint is not set: this run starts from step 0 and writes its own checkpoints next to them, "
        f"replacing any with the same step number.{rotation} Its model card (README.md) is overwritten too. To keep "
        "them, pass a new output_dir; to continue that run, pass resume_from_checkpoint=True (or the path of one of "
        "its checkpoints)."
    )


def check_output_dir(output_dir: str, option: str = "output_dir") -> None:
    """Refuse, before anything is loaded or trained, an `output_dir` that is a file or lies below one."""
    path = os.path.abspath(output_dir)
    while True:
        if os.path.exists(path) and not os.path.isdir(path):
            inside = "" if path == os.path.abspath(output_dir) else f" ({output_dir} would lie inside it)"
            raise NotADirectoryError(
                f"{option} {output_dir}: {path} is an existing file, not a folder{inside}, so nothing could be "
                f"written there. Pass the path of a folder (new or existing) as {option}."
            )
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


LOCK_FILE = "_trl-midalign.lock"


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def acquire_output_dir_lock(output_dir: str) -> str:
    """
    Take the lock of `output_dir` for this run: a file `_trl-midalign.lock` naming the process (pid, host, start
    time), created atomically. A lock held by a live run refuses this one, naming it; a lock left by a process of this
    host that is gone (killed, crashed) is taken over with a warning. Returns the lock file's path.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    other = json.load(f)
                pid, host = int(other["pid"]), str(other["host"])
            except (OSError, ValueError, KeyError, TypeError):
                other, pid, host = {}, None, None  # being written right now, or not ours: treat as held
            if pid is not None and host == me["host"] and not _pid_is_alive(pid):
                logger.warning(
                    f"{path} names a run (pid {pid} on {host}, started {other.get('started')}) that is no longer "
                    "running (killed or crashed): taking the lock over. Its last checkpoints may be incomplete; "
                    "resuming names the newest intact one."
                )
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            held_by = f"pid {pid} on host {host}, started {other.get('started')}" if pid is not None else "another run"
            raise RuntimeError(
                f"output_dir {output_dir} is in use by another training run ({held_by}; lock file {path}): two runs "
                "writing into one folder overwrite and rotate each other's checkpoints. Give this run its own "
                "output_dir, or wait for the other run to finish. If that run is gone (for example on another host), "
                f"delete {path}."
            ) from None
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return path
    raise RuntimeError(f"Could not take the lock {path} of output_dir {output_dir}: it keeps being re-created.")


def release_output_dir_lock(path: str) -> None:
    """Remove the lock taken by [`acquire_output_dir_lock`], if it is still this process's."""
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as f:
            if json.load(f).get("pid") != os.getpid():
                return
        os.remove(path)


def no_space_error(error: BaseException, checkpoint: str) -> OSError | None:
    """
    The error to raise for a failed checkpoint save when the disk is full, or `None` when it is not a full disk: an
    `OSError` with `errno.ENOSPC` (or `EDQUOT`), an error of another writer that says so (safetensors: "No space left
    on device (os error 28)"), or torch's stream errors (`iostream error`, `unexpected pos`, `file write failed`)
    while the filesystem has (almost) no space left.
    """
    folder = os.path.dirname(checkpoint) or "."
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        full = True
    elif "No space left on device" in str(error) or "os error 28" in str(error):
        full = True
    elif any(
        text in str(error) for text in ("iostream error", "unexpected pos", "file write failed", "PytorchStreamWriter")
    ):
        try:
            full = shutil.disk_usage(folder).free < 16 * 2**20
        except OSError:
            full = False
    else:
        full = False
    if not full:
        return None
    return OSError(
        errno.ENOSPC,
        f"No space left on the device of {folder} while saving {checkpoint}: that checkpoint is incomplete (do not "
        f"resume from it). Free some space (or lower save_total_limit), then resume. {resume_advice(folder)}",
    )
