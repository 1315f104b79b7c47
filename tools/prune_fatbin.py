"""List, or prune to the GPUs at hand, the CUDA machine code inside a shared library.

A CUDA library (onnxruntime-gpu's ``libonnxruntime_providers_cuda.so``, say) embeds one fat
binary per translation unit in its ``.nv_fatbin`` section, each holding a cubin per GPU
architecture it was built for (and maybe PTX). The driver loads, for the GPU it runs on, one
image it can use (a cubin of the same major version and no newer minor, else PTX to compile)
and never reads the others. ``--keep 90`` overwrites with zeros every cubin that no listed
architecture can use, leaving every header, size and offset as it was, so the library's
layout is untouched while the zeros compress to nothing. That is what lets
``tools/gpu_carry.sh`` carry onnxruntime-gpu for an H100/H200 (sm_90) in far fewer parts.

Run: python tools/prune_fatbin.py LIB                 # list the images per architecture
     python tools/prune_fatbin.py LIB --keep 90 [80]  # prune in place (atomically)

Refuses, changing nothing, where no image is usable on a listed architecture or where the
section does not parse as the fat-binary layout below. (A fat binary may hold no image for a
listed architecture even before pruning: onnxruntime-gpu 1.31 has nine with sm_120 code only.
Their kernels could not run on that GPU in any case.)
"""

from __future__ import annotations

import argparse
import collections
import os
import struct
import sys
from dataclasses import dataclass

from torq_onnx.atomic import write_bytes_atomic

FATBIN_MAGIC = 0xBA55ED50
HEADER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries that follow
ENTRY = struct.Struct("<HHIQ")  # kind, version, header size, payload size (padded)
ENTRY_ARCH_OFFSET = 28  # u32 sm version (75, 80, 90, ...) inside an entry's header
PTX, CUBIN = 1, 2


class FatbinError(ValueError):
    pass


@dataclass(frozen=True)
class Image:
    fatbin: int  # index of the fat binary holding it
    kind: int
    arch: int
    payload: slice  # byte range in the file

    def usable_on(self, arch: int) -> bool:
        if self.kind == PTX:
            return self.arch <= arch
        return self.arch // 10 == arch // 10 and self.arch <= arch


def fatbin_section(data: bytes | bytearray) -> slice:
    """The byte range of the ELF64 section ``.nv_fatbin``."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise FatbinError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    section = struct.Struct("<IIQQQQIIQQ")  # name, type, flags, addr, offset, size, link, info, align, entsize

    def header(i: int) -> tuple:
        return section.unpack_from(data, shoff + i * shentsize)

    names = header(shstrndx)[4]
    for i in range(shnum):
        name, _, _, _, offset, size, *_ = header(i)
        end = data.index(0, names + name)
        if data[names + name:end] == b".nv_fatbin":
            return slice(offset, offset + size)
    raise FatbinError("no .nv_fatbin section: the file holds no CUDA device code")


def images(data: bytes | bytearray) -> list[Image]:
    """Every image of every fat binary in the library, in file order."""
    sec = fatbin_section(data)
    found, pos, n = [], sec.start, 0
    while pos + HEADER.size <= sec.stop:
        magic, _, hsize, size = HEADER.unpack_from(data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned; zeros pad between them
            continue
        entry, end = pos + hsize, pos + hsize + size
        if end > sec.stop:
            raise FatbinError(f"fat binary {n} at offset {pos:#x} runs past its section")
        while entry < end:
            kind, _, ehsize, psize = ENTRY.unpack_from(data, entry)
            if kind not in (PTX, CUBIN) or entry + ehsize + psize > end:
                raise FatbinError(f"fat binary {n}: unknown image layout at offset {entry:#x}")
            (arch,) = struct.unpack_from("<I", data, entry + ENTRY_ARCH_OFFSET)
            found.append(Image(n, kind, arch, slice(entry + ehsize, entry + ehsize + psize)))
            entry += ehsize + psize
        pos, n = end, n + 1
    if not found:
        raise FatbinError("the .nv_fatbin section holds no fat binary")
    return found


def summary(data: bytes | bytearray, found: list[Image]) -> str:
    sizes: dict[tuple[str, int], int] = collections.Counter()
    zeroed = 0
    for im in found:
        n = im.payload.stop - im.payload.start
        if data[im.payload] == bytes(n):
            zeroed += n  # pruned before
        else:
            sizes["ptx" if im.kind == PTX else "sm", im.arch] += n
    listed = ", ".join(f"{k}_{a}: {s / 1e6:.1f} MB" for (k, a), s in sorted(sizes.items()))
    return f"{len({im.fatbin for im in found})} fat binaries; {listed}" + (f"; zeros: {zeroed / 1e6:.1f} MB" if zeroed else "")


def prune(data: bytearray, keep: list[int]) -> int:
    """Zero, in data, every cubin no architecture in keep can use; returns the bytes zeroed."""
    found = images(data)
    for arch in keep:
        if not any(im.usable_on(arch) for im in found):
            have = sorted({im.arch for im in found})
            raise FatbinError(f"no image is usable on sm_{arch} (the library has images for {have}): nothing pruned")
    zeroed = 0
    for im in found:
        zeros = bytes(im.payload.stop - im.payload.start)
        if im.kind == CUBIN and not any(im.usable_on(arch) for arch in keep) and data[im.payload] != zeros:
            data[im.payload] = zeros
            zeroed += len(zeros)
    return zeroed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("library")
    ap.add_argument("--keep", type=int, nargs="+", metavar="SM", help="architectures to keep, e.g. 90 (H100/H200)")
    args = ap.parse_args()
    try:
        with open(args.library, "rb") as f:
            data = bytearray(f.read())
        print(f"{args.library}: {summary(data, images(data))}")
        if args.keep:
            zeroed = prune(data, args.keep)
            mode = os.stat(args.library).st_mode
            os.chmod(write_bytes_atomic(args.library, bytes(data)), mode)
            print(f"zeroed {zeroed / 1e6:.1f} MB of cubins no GPU of sm_{', sm_'.join(map(str, args.keep))} can use")
    except (OSError, FatbinError) as e:
        sys.exit(f"prune_fatbin: {args.library}: {e}")


if __name__ == "__main__":
    main()
