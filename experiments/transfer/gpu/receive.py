"""On the device: keep the GGUF part of one call folder (checked against the manifest), the task data of call 1, and
assemble the GGUF file once every part is there (checked against the whole file's sha256). Used by run_gpu.sh.

    python3 experiments/transfer/gpu/receive.py .gpu/call1 /tmp/midalign_gpu out
"""

import hashlib
import json
import os
import shutil
import sys


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def receive(folder: str, root: str, output: str = "out") -> str | None:
    """Keep `folder`'s part (and data) under `root`; the assembled GGUF's path once complete, else None."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    gguf = os.path.join(root, "gemma-3-270m.gguf")
    parts_dir = os.path.join(root, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(folder))
    for part in manifest["parts"]:
        source = os.path.join(os.path.dirname(folder), part["file"])
        if f"call{part['call']}" == name and not os.path.isfile(gguf):
            if sha256(source) != part["sha256"]:
                raise SystemExit(f"{source}: sha256 differs from the manifest; run prepare again here and resend.")
            shutil.copyfile(source, os.path.join(parts_dir, os.path.basename(part["file"])))
    if os.path.isdir(os.path.join(folder, "data")):
        target = os.path.join(root, output, "data")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(folder, "data"), target)
    if os.path.isfile(gguf):
        print(f"[receive] {gguf} is already assembled")
        return gguf
    have = [os.path.join(parts_dir, os.path.basename(p["file"])) for p in manifest["parts"]]
    missing = [p["call"] for p, path in zip(manifest["parts"], have) if not os.path.isfile(path)]
    if missing:
        print(f"[receive] kept {folder}; calls still to send: {missing}")
        return None
    with open(gguf + ".tmp", "wb") as target:
        for path in have:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, target)
    if sha256(gguf + ".tmp") != manifest["gguf_sha256"]:
        raise SystemExit("The assembled GGUF's sha256 differs from the manifest; resend the parts.")
    os.replace(gguf + ".tmp", gguf)
    shutil.rmtree(parts_dir)
    print(f"[receive] assembled {gguf} ({os.path.getsize(gguf):,} bytes, sha256 checked)")
    return gguf


if __name__ == "__main__":
    receive(*sys.argv[1:])
