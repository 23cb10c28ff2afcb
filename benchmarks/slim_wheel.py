"""Rewrite a wheel without the shared libraries a machine does not load, so that it fits what travels to the GPU
machine (64 MiB in all): bitsandbytes 0.50 ships one CUDA library per CUDA version (43 MB); the H200 machine's torch
is built for CUDA 13.0, which loads ``libbitsandbytes_cuda130.so``.

    python benchmarks/slim_wheel.py WHEEL KEEP_GLOB [KEEP_GLOB ...]
    python benchmarks/slim_wheel.py .whl_extra/bitsandbytes-0.50.2-*.whl '*cuda13*.so' '*_cpu.so'

Every ``.so`` not matching a ``KEEP_GLOB`` is dropped; ``RECORD`` is rewritten with the hashes and sizes of what is
kept (the wheel format's ``sha256=<urlsafe base64>``), and the wheel replaced in place under its own name.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import os
import sys
import zipfile


def slim(path: str, keep: list[str]) -> None:
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    kept = [(i, data) for i, data in entries if not i.filename.endswith(".so")
            or any(fnmatch.fnmatch(i.filename, pattern) for pattern in keep)]
    record = next(i.filename for i, _ in kept if i.filename.endswith(".dist-info/RECORD"))
    lines = []
    for info, data in kept:
        if info.filename == record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{info.filename},sha256={digest},{len(data)}")
    lines.append(f"{record},,")
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info, data in kept:
            out.writestr(info, "\n".join(lines) + "\n" if info.filename == record else data,
                         compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)
    names = {i.filename for i, _ in kept}
    dropped = sorted(os.path.basename(i.filename) for i, _ in entries if i.filename not in names)
    print(f"{path}: kept {len(kept)} files, dropped {dropped}; {os.path.getsize(path) / 2**20:.1f} MiB")


if __name__ == "__main__":
    slim(sys.argv[1], sys.argv[2:])
