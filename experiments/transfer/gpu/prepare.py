"""Pack what the GPU run needs into call-sized folders under `<repo>/.gpu/` (ignored by git), here, before the calls.

The device machine has no network and takes at most 64 MiB of working tree per call (tracked and untracked files and
the carried paths together), so the Gemma 3 270M GGUF file (253,113,024 bytes) and the Python wheels the device lacks
travel in parts, one folder per call: `.gpu/call1` (the wheels, the task data built here with `transfer.py
--data_only`, since the device cannot download the help packages, and the first part), `.gpu/call2`, ... Each folder
stays under `--budget` bytes, leaving the rest of the 64 MiB to the working tree. `.gpu/manifest.json` records the
parts, their sha256 and the whole file's; `run_gpu.sh receive N` on the device checks them.

    python experiments/transfer/gpu/prepare.py              # downloads the wheels with pip, splits the GGUF
    python experiments/transfer/gpu/prepare.py --no_wheels  # the CPU dry run needs no wheels

See GPU.md beside this file.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys


# The versions of this machine's stack that the device image lacks or has in another version (its transformers is
# 5.17, and it has no trl, datasets or gguf); installed there with `pip install --no-deps --target`.
WHEELS = [
    "trl==1.16.0", "transformers==5.25.0", "peft==0.21.2", "datasets==5.2.0", "accelerate==1.16.0", "gguf==0.19.0",
    "dill==0.4.1", "multiprocess==0.70.19", "huggingface_hub==2.4.0", "httpx2==2.17.0", "kernels==0.19.1",
]  # fmt: skip
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(folder: str) -> None:
    """The wheels of `WHEELS` for the device's Python 3.12 on x86-64 (pip, no dependencies: the image has the rest)."""
    platforms = [flag for name in PLATFORMS for flag in ("--platform", name)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *platforms, "-d", folder, *WHEELS]  # fmt: skip
    subprocess.run(command, check=True)


def split(gguf: str, out: str, budget: int, first_call_bytes: int) -> list[dict]:
    """Cut `gguf` into parts: call 1 gets `budget - first_call_bytes`, the others `budget` each."""
    parts, size, offset, call = [], os.path.getsize(gguf), 0, 1
    with open(gguf, "rb") as source:
        while offset < size:
            length = min(size - offset, budget - (first_call_bytes if call == 1 else 0))
            if length <= 0:
                raise ValueError(
                    f"--budget {budget} leaves no room for a part beside {first_call_bytes} bytes of wheels."
                )
            folder = os.path.join(out, f"call{call}")
            os.makedirs(folder, exist_ok=True)
            name = f"gguf.part{call:02d}"
            with open(os.path.join(folder, name), "wb") as target:
                target.write(source.read(length))
            parts.append({"call": call, "file": f"call{call}/{name}", "bytes": length,
                          "sha256": sha256(os.path.join(folder, name))})  # fmt: skip
            offset += length
            call += 1
    return parts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=None, help="the checkout the device tool sends (default: this one)")
    parser.add_argument("--gguf", default=None, help="the GGUF file (default: trl_midalign.demo's assembled one)")
    parser.add_argument("--budget", type=int, default=58_000_000, help="bytes per call folder (64 MiB minus the tree)")
    parser.add_argument("--no_wheels", action="store_true", help="skip the wheels (a CPU dry run needs none)")
    parser.add_argument("--data", default=None, help="a driver output's data folder (--data_only) to send in call 1")
    args = parser.parse_args(argv)
    repo = args.repo or subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                                       check=True).stdout.strip()  # fmt: skip
    exclude = subprocess.run(["git", "-C", repo, "rev-parse", "--git-path", "info/exclude"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    exclude = exclude if os.path.isabs(exclude) else os.path.join(repo, exclude)
    os.makedirs(os.path.dirname(exclude), exist_ok=True)
    lines = open(exclude).read().splitlines() if os.path.isfile(exclude) else []
    if "/.gpu/" not in lines:
        with open(exclude, "a") as f:
            f.write("/.gpu/\n")
    out = os.path.join(repo, ".gpu")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "call1", "wheels"))
    if not args.no_wheels:
        download_wheels(os.path.join(out, "call1", "wheels"))
    wheels = sorted(os.listdir(os.path.join(out, "call1", "wheels")))
    if args.data:
        shutil.copytree(args.data, os.path.join(out, "call1", "data"))
    first = os.path.join(out, "call1")
    wheel_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(first) for f in files)
    if args.gguf is None:
        from trl_midalign.demo.gemma import gemma3_270m_gguf

        args.gguf = gemma3_270m_gguf()
    parts = split(args.gguf, out, args.budget, wheel_bytes)
    manifest = {"gguf_bytes": os.path.getsize(args.gguf), "gguf_sha256": sha256(args.gguf), "parts": parts,
                "wheels": wheels, "wheel_bytes": wheel_bytes, "calls": len(parts)}  # fmt: skip
    # the manifest travels with every call (a few hundred bytes)
    for part in parts:
        with open(os.path.join(out, f"call{part['call']}", "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    for part in parts:
        folder = os.path.join(out, f"call{part['call']}")
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
        print(f"{folder}: {total:,} bytes")
    return manifest


if __name__ == "__main__":
    main()
