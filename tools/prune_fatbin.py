"""List, or prune to the GPUs at hand, the CUDA machine code inside a shared library.

A CUDA library (onnxruntime-gpu's ``libonnxruntime_providers_cuda.so``, say) embeds one fat
binary per translation unit in its ``.nv_fatbin`` section, each holding a cubin per GPU
architecture it was built for (and maybe PTX), often zstd-compressed. The driver loads, for
the GPU it runs on, one image it can use (a cubin of the same major version and no newer
minor, else PTX to compile). ``--keep 90`` rewrites each fat binary as a build for the listed
architectures would have made it: its cubins that no listed GPU can use are dropped, the
images it keeps (every PTX included) move up behind its header unchanged, its size field
shrinks, and zeros fill the rest of its old extent. No other byte of the file moves, so the
library's layout and every pointer into it stay valid, while the zeros compress to nothing:
that is what lets ``tools/gpu_carry.sh`` carry onnxruntime-gpu for an H100/H200 (sm_90) in
far fewer parts. A fat binary with no image usable on the listed GPUs (onnxruntime-gpu 1.31
has nine, sm_120 code only) is left exactly as built.

Run: python tools/prune_fatbin.py LIB                 # list the images per architecture
     python tools/prune_fatbin.py LIB --keep 90 [80]  # prune in place (atomically)

Refuses, changing nothing, where no image is usable on a listed architecture or where the
section does not parse as the fat-binary layout below.
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
HEADER_SIZE_OFFSET = 8
ENTRY = struct.Struct("<HHIQ")  # kind, version, header size, payload size (padded)
ENTRY_ARCH_OFFSET = 28  # u32 sm version (75, 80, 90, ...) inside an entry's header
PTX, CUBIN = 1, 2


class FatbinError(ValueError):
    pass


@dataclass(frozen=True)
class Image:
    kind: int
    arch: int
    entry: slice  # its header and payload, as byte offsets in the file

    def usable_on(self, arch: int) -> bool:
        if self.kind == PTX:
            return self.arch <= arch
        return self.arch // 10 == arch // 10 and self.arch <= arch


@dataclass(frozen=True)
class Fatbin:
    offset: int  # of its header in the file
    entries: slice  # the bytes its size field covers
    images: list[Image]


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


def fatbins(data: bytes | bytearray) -> list[Fatbin]:
    """Every fat binary in the library, with its images, in file order."""
    sec = fatbin_section(data)
    found, pos = [], sec.start
    while pos + HEADER.size <= sec.stop:
        magic, _, hsize, size = HEADER.unpack_from(data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned; zeros pad between them
            continue
        entries = slice(pos + hsize, pos + hsize + size)
        if entries.stop > sec.stop:
            raise FatbinError(f"fat binary {len(found)} at offset {pos:#x} runs past its section")
        images, e = [], entries.start
        while e < entries.stop:
            kind, _, ehsize, psize = ENTRY.unpack_from(data, e)
            if kind not in (PTX, CUBIN) or e + ehsize + psize > entries.stop:
                raise FatbinError(f"fat binary {len(found)}: unknown image layout at offset {e:#x}")
            (arch,) = struct.unpack_from("<I", data, e + ENTRY_ARCH_OFFSET)
            images.append(Image(kind, arch, slice(e, e + ehsize + psize)))
            e += ehsize + psize
        found.append(Fatbin(pos, entries, images))
        pos = entries.stop
    if not any(fb.images for fb in found):
        raise FatbinError("the .nv_fatbin section holds no fat binary")
    return found


def summary(found: list[Fatbin]) -> str:
    sizes: dict[tuple[str, int], int] = collections.Counter()
    for im in (im for fb in found for im in fb.images):
        sizes["ptx" if im.kind == PTX else "sm", im.arch] += im.entry.stop - im.entry.start
    listed = ", ".join(f"{k}_{a}: {s / 1e6:.1f} MB" for (k, a), s in sorted(sizes.items()))
    return f"{len(found)} fat binaries; {listed}"


def prune(data: bytearray, found: list[Fatbin], keep: list[int]) -> int:
    """Drop, in data, every cubin no architecture in keep can use; returns the bytes freed.
    ``found``: :func:`fatbins` of data."""
    every = [im for fb in found for im in fb.images]
    for arch in keep:
        if not any(im.usable_on(arch) for im in every):
            have = sorted({im.arch for im in every})
            raise FatbinError(f"no image is usable on sm_{arch} (the library has images for {have}): nothing pruned")
    freed = 0
    for fb in found:
        if not any(im.usable_on(arch) for im in fb.images for arch in keep):
            continue  # nothing here runs on these GPUs even as built: leave it as it is
        kept = [im for im in fb.images if im.kind == PTX or any(im.usable_on(arch) for arch in keep)]
        if len(kept) == len(fb.images):
            continue
        entries = b"".join(data[im.entry] for im in kept)
        old = fb.entries.stop - fb.entries.start
        data[fb.entries] = entries + bytes(old - len(entries))
        struct.pack_into("<Q", data, fb.offset + HEADER_SIZE_OFFSET, len(entries))
        freed += old - len(entries)
    return freed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("library")
    ap.add_argument("--keep", type=int, nargs="+", metavar="SM", help="architectures to keep, e.g. 90 (H100/H200)")
    args = ap.parse_args()
    try:
        with open(args.library, "rb") as f:
            data = bytearray(f.read())
        found = fatbins(data)
        print(f"{args.library}: {summary(found)}")
        if args.keep:
            freed = prune(data, found, args.keep)
            mode = os.stat(args.library).st_mode
            os.chmod(write_bytes_atomic(args.library, bytes(data)), mode)
            print(f"dropped {freed / 1e6:.1f} MB of images no GPU of sm_{', sm_'.join(map(str, args.keep))} can use; "
                  f"now: {summary(fatbins(data))}")
    except (OSError, FatbinError) as e:
        sys.exit(f"prune_fatbin: {args.library}: {e}")


if __name__ == "__main__":
    main()
