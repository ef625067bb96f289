"""Pack what bench/gpu_run.sh needs on a CUDA machine with no network into .gpurun/ (git-ignored).

    python3 scripts/gpu_pack.py [--commit HEAD] [--fbgemm 1.6.0] [--torchrec 1.6.1] [--arch 90]

  .gpurun/tree/                 the repo at --commit (git archive): code, configs, MovieLens 100K, synthetic
  .gpurun/whl/                  wheels that machine lacks: torchrec and what it needs beyond the image
  .gpurun/fbgemm_gpu.tar.xz     the CUDA fbgemm-gpu, cut down to fit a 64 MiB transfer

The CUDA `fbgemm-gpu` wheel is ~465 MB (2.4 GB unpacked), nearly all of it GPU code (the `.nv_fatbin`
section of each .so: one fat binary per CUDA source file, each with a cubin per architecture, here
sm_80, sm_90a and sm_100a). The cut keeps every .so and every host-side byte (so every operator still
registers) and rewrites fat binaries in place, offsets unchanged, the removed bytes zeroed:

- kept fat binaries keep only their --arch cubins;
- fat binaries of TBE variants plexrec never runs keep no cubin for --arch (one header-only entry of
  another architecture: what the driver sees in a library built without that architecture; their
  kernels would fail at launch with "no kernel image", and none is launched): the other optimizers
  (plexrec trains with EXACT_ROWWISE_ADAGRAD), SSD, the DENSE kernel, variable batch (VBE), global
  weight decay, and the quantized inference TBE.

2.4 GB with most of it zeros packs to ~24 MB with xz. The import of fbgemm_gpu and torchrec with this
cut works on the CPU (checked here with the same torch), and bench/tbe_check.py checks the GPU kernels
against the CPU ones on the device.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FATBIN_MAGIC = 0xBA55ED50
ENTRY = "<HHIQIIHHIIIQ"  # kind, version, header size, payload size, compressed size, _, minor, major, arch, ...
PIP_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64"]
# torchrec's needs that the device image lacks (tensordict needs pyvers; torchrec pins torchmetrics 1.0.3)
EXTRA_WHEELS = ["tensordict==0.15.3", "pyvers==0.2.3", "iopath==0.1.9", "torchmetrics==1.0.3"]
TREE_PATHS = ["recsys", "features", "bench", "configs", "plexrec", "protos", "data/ml-100k", "data/synthetic",
              "pyproject.toml"]
OPTIMIZER_SOURCE = re.compile(r"gen_embedding_backward_(\w+?)_(split|ssd|dense)_")
UNUSED_SOURCE = re.compile(r"_(ssd|dense)_|_vbe_|_gwd_")
UNUSED_LIBRARIES = {"fbgemm_gpu_tbe_inference.so", "fbgemm_gpu_tbe_training_backward_vbe.so",
                    "fbgemm_gpu_tbe_training_backward_gwd.so", "fbgemm_gpu_tbe_training_backward_dense.so"}
TBE_LIBRARIES = {"fbgemm_gpu_tbe_training_forward.so", "fbgemm_gpu_tbe_training_backward.so"}


def nv_fatbin(data: bytes) -> tuple[int, int] | None:
    """(offset, size) of the ELF64 section .nv_fatbin."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    for header in headers:
        start = names + header[0]
        if data[start:data.index(b"\0", start)] == b".nv_fatbin":
            return header[4], header[5]
    return None


def fat_binaries(data: bytes, offset: int, size: int):
    """(position, header size, payload size, entries) of each fat binary in the section."""
    pos = offset
    while pos < offset + size:
        if struct.unpack_from("<I", data, pos)[0] != FATBIN_MAGIC:
            pos += 8  # alignment padding between fat binaries
            continue
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        entries, at = [], pos + header_size
        while at < pos + header_size + fat_size:
            kind, _, entry_header, payload, *_, arch, _, _, flags = struct.unpack_from(ENTRY, data, at)
            entries.append({"at": at, "header": entry_header, "total": entry_header + payload, "arch": arch,
                            "flags": flags})
            at += entry_header + payload
        yield pos, header_size, fat_size, entries
        pos += header_size + fat_size


def cubin(data: bytes, entry: dict) -> bytes:
    payload = data[entry["at"] + entry["header"]: entry["at"] + entry["total"]]
    if entry["flags"] & 0x8000:  # zstd-compressed cubin
        try:
            import zstandard
            return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
        except ImportError:
            return subprocess.run(["zstd", "-dc"], input=payload, capture_output=True, check=True).stdout
    return payload


def unused(library: str, sources: list[str]) -> str | None:
    """Why a fat binary (named by its CUDA source files) is code plexrec's training never runs, or None."""
    if library in UNUSED_LIBRARIES:
        return library
    for source in sources:
        match = OPTIMIZER_SOURCE.search(source)
        if match and (match.group(1), match.group(2)) != ("rowwise_adagrad", "split"):
            return f"{match.group(1)} {match.group(2)}"
    if library in TBE_LIBRARIES and sources and all(UNUSED_SOURCE.search(s) for s in sources):
        return "ssd/dense/vbe/gwd"
    return None


def cut(path: Path, arch: int) -> dict:
    data = bytearray(path.read_bytes())
    section = nv_fatbin(data)
    counts = {"kept": 0, "emptied": 0, "bytes_kept": 0}
    if section is None:
        return counts
    for pos, header_size, fat_size, entries in list(fat_binaries(data, *section)):
        own = [e for e in entries if e["arch"] == arch]
        sources = sorted({m.decode() for e in own
                          for m in re.findall(rb"_INTERNAL_[0-9a-f]{8}_\d+_(\w+?_cu)_", cubin(data, e))})
        if own and unused(path.name, sources) is None:
            blob = b"".join(bytes(data[e["at"]:e["at"] + e["total"]]) for e in own)
            counts["kept"] += 1
        else:
            other = next(e for e in entries if e["arch"] != arch)
            head = bytearray(data[other["at"]:other["at"] + other["header"]])
            struct.pack_into("<Q", head, 8, 0)   # payload size
            struct.pack_into("<I", head, 16, 0)  # compressed size
            flags, = struct.unpack_from("<Q", head, 40)
            struct.pack_into("<Q", head, 40, flags & ~0x8000)
            if len(head) >= 64:
                struct.pack_into("<Q", head, 56, 0)  # uncompressed size
            blob = bytes(head)
            counts["emptied"] += 1
        struct.pack_into("<Q", data, pos + 8, len(blob))
        data[pos + header_size: pos + header_size + len(blob)] = blob
        data[pos + header_size + len(blob): pos + header_size + fat_size] = bytes(fat_size - len(blob))
        counts["bytes_kept"] += len(blob)
    path.write_bytes(data)
    return counts


def pip_download(requirement: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PIP_PLATFORM, "-d", str(into),
                    requirement], check=True)
    name = requirement.split("==")[0].replace("-", "_")
    return next(p for p in into.glob("*.whl") if p.name.lower().startswith(f"{name.lower()}-{requirement.split('==')[1]}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--fbgemm", default="1.6.0", help="fbgemm-gpu release (1.6.x: torch 2.11)")
    parser.add_argument("--torchrec", default="1.6.1")
    parser.add_argument("--arch", type=int, default=90, help="GPU architecture kept (90: H100/H200)")
    parser.add_argument("--cache", default="/tmp/plexrec-gpu-pack", help="downloads and the unpacked wheel")
    parser.add_argument("--out", default=str(ROOT / ".gpurun"))
    args = parser.parse_args()
    out, cache = Path(args.out), Path(args.cache)

    wheel = pip_download(f"fbgemm-gpu=={args.fbgemm}", cache)
    unpacked = cache / f"fbgemm-{args.fbgemm}-sm{args.arch}"
    if not (unpacked / "DONE").exists():
        shutil.rmtree(unpacked, ignore_errors=True)
        zipfile.ZipFile(wheel).extractall(unpacked)
        report = {so.name: cut(so, args.arch) for so in sorted((unpacked / "fbgemm_gpu").glob("*.so"))}
        (unpacked / "DONE").write_text(json.dumps(report, indent=1))
    print((unpacked / "DONE").read_text())
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "fbgemm_gpu.tar.xz"
    members = sorted(p.name for p in unpacked.iterdir() if p.name != "DONE")
    if not archive.exists() or archive.stat().st_mtime < (unpacked / "DONE").stat().st_mtime:
        subprocess.run(f"tar -C {unpacked} -cf - {' '.join(members)} | xz -T0 -9 > {archive}.part && "
                       f"mv {archive}.part {archive}", shell=True, check=True)

    shutil.rmtree(out / "whl", ignore_errors=True)
    (out / "whl").mkdir()
    for requirement in [f"torchrec=={args.torchrec}", *EXTRA_WHEELS]:
        shutil.copy(pip_download(requirement, cache), out / "whl")
    shutil.rmtree(out / "tree", ignore_errors=True)
    (out / "tree").mkdir()
    subprocess.run(f"git -C {ROOT} archive {args.commit} {' '.join(TREE_PATHS)} | tar -C {out / 'tree'} -xf -",
                   shell=True, check=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.commit],
                            capture_output=True, text=True, check=True).stdout.strip()
    (out / "tree" / "COMMIT").write_text(commit + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB (tree at {commit}, fbgemm-gpu {args.fbgemm} sm_{args.arch}, "
          f"torchrec {args.torchrec})")


if __name__ == "__main__":
    main()
