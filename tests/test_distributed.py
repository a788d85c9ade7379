"""Real 2-process launches on CPU: DDP (gloo) and DeepSpeed ZeRO-2/ZeRO-3 keep the ranks' weights identical; FSDP2
(`fully_shard`, under `torch.distributed.run`) computes the same losses, gradients and weights as the unsharded model.

Each launch trains a tiny LoRA model with the alternate schedule, whose alignment steps leave the blocks above the
aligned layer without gradients, and whose alignment forward must run inside one forward of the DDP/DeepSpeed wrapper.
"""

import json
import os
import socket
import subprocess
import sys

import pytest


HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path, launcher_args, schedule="alternate"):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher_args,
        os.path.join(HERE, "scripts", "train_two_ranks.py"), str(output_dir), schedule,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return ranks


def check_identical_and_trained(ranks, distributed_type):
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["distributed_type"] == distributed_type for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"], "ranks diverged"
    assert ranks[0]["changed"], "no parameter changed"
    logs = [log for log in ranks[0]["log_history"] if "loss" in log]
    assert logs and all("task_loss" in log and "align_loss" in log for log in logs)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["alternate", "joint"])
def test_ddp_two_processes(tmp_path, schedule):
    ranks = launch(tmp_path, ["--num_processes", "2", "--multi_gpu"], schedule)
    check_identical_and_trained(ranks, "DistributedType.MULTI_CPU")


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(tmp_path):
    ranks = launch(tmp_path, ["--config_file", os.path.join(HERE, "scripts", "zero2.yaml")])
    check_identical_and_trained(ranks, "DistributedType.DEEPSPEED")


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_with_partitioning(tmp_path):
    ranks = launch(tmp_path, ["--config_file", os.path.join(HERE, "scripts", "zero3.yaml")])
    check_identical_and_trained(ranks, "DistributedType.DEEPSPEED")
    assert all(r["zero3_partitioned"] for r in ranks), "ZeRO-3 did not partition the parameters"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "checkpointing"])
@pytest.mark.parametrize("schedule", ["alternate", "joint", "alignment_only"])
def test_fsdp2_two_processes_equal_the_unsharded_model(tmp_path, schedule, variant):
    """accelerate never enables FSDP on CPU: the script shards with `fully_shard` per block and root, as accelerate's
    transformer-based wrap does, and runs 4 micro-steps of compute_loss + backward + SGD next to the unsharded model."""
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        os.path.join(HERE, "scripts", "fsdp2_steps.py"), str(output_dir), schedule, variant,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["sharded"], "the parameters were not sharded"
        assert rank["changed"], "no parameter changed"
        assert len(rank["losses"]) == 4
        assert rank["worst"]["loss"] <= 1e-6, rank["losses"]
        assert rank["worst"]["grad"] <= 1e-6, rank["worst"]
        assert rank["worst"]["weight"] <= 1e-6, rank["worst"]
    assert ranks[0]["losses"] != ranks[1]["losses"], "both ranks saw the same batches"
