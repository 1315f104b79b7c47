"""Readers of the kernels' GPU code that find the floating-point instructions by which a GPU
could compute other values than the host tests check: flush-to-zero, approximate functions,
rounding other than to nearest even, and (in PTX) a multiply or add without an explicit
rounding mode, which ptxas is free to fuse into a multiply-add.

The host harness and the thread emulator (tests/simt) run the kernels' arithmetic bit-exact
against the numpy reference, compiled for the host with IEEE float and -ffp-contract=off.
A GPU build free of these instructions asks the hardware for exactly those IEEE operations,
so what stays unchecked without a GPU is the hardware's conformance to PTX's IEEE
instructions (fma.rn, mul.rn, cvt.rni, min/max)."""

from __future__ import annotations

import re
from collections import Counter

# an instruction at the start of a line, or of an inline-asm block ("{ cvt.rn.f16.f32 ...}", cuda_fp16.h)
_PTX_INSTRUCTION = re.compile(r"^\s*(?:\{\s*)?(?:@!?%\w+\s+)?([a-z]\w*(?:\.\w+)+)\s", re.M)
_PTX_FLOAT_TYPES = frozenset({"f16", "f16x2", "bf16", "bf16x2", "f32", "f64"})
_PTX_ROUNDED = frozenset({"add", "sub", "mul", "mad", "fma", "div", "rcp", "sqrt"})  # results that round
_SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)")
_SASS_FLOAT_UNITS = ("F", "H", "D", "MUFU", "I2F")  # FFMA, F2F, HADD2, DMUL, ...


def ptx_float_ops(ptx: str) -> Counter[str]:
    """PTX instructions on a floating-point type, counted by opcode with modifiers ('fma.rn.f32')."""
    return Counter(op for op in _PTX_INSTRUCTION.findall(ptx) if _PTX_FLOAT_TYPES & set(op.split(".")[1:]))


def ptx_problem(op: str) -> str | None:
    """Why a PTX float instruction could give other bits than its IEEE operation, or None."""
    name, *mods = op.split(".")
    if "ftz" in mods:
        return "flushes subnormals to zero"
    if {"approx", "full"} & set(mods):
        return "approximate"
    if {"rz", "rm", "rp"} & set(mods):  # .rzi/.rmi/.rpi (trunc/floor/ceil) are exact
        return "rounds other than to nearest even"
    if name in _PTX_ROUNDED and "rn" not in mods:
        return "no explicit .rn, so ptxas may fuse it into a multiply-add"
    return None


def sass_float_ops(sass: str) -> Counter[str]:
    """SASS instructions of the floating-point units, counted by opcode with modifiers ('FFMA')."""
    return Counter(op for op in _SASS_INSTRUCTION.findall(sass) if op.startswith(_SASS_FLOAT_UNITS))


def sass_functions(sass: str) -> list[tuple[str, str]]:
    """(name, SASS) of every function in cuobjdump's listing, once per architecture it holds."""
    return re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S)


def sass_problem(op: str) -> str | None:
    """Why a SASS float instruction could give other bits than its IEEE operation, or None.
    Stricter than the PTX rules: ptxas also builds exact operations from these (a correctly
    rounded division or square root, an integer division from MUFU.RCP, I2F.RP and
    F2I.FTZ), so only code that uses none of them, as the MXFP4 kernels, passes."""
    name, *mods = op.split(".")
    if name == "MUFU":
        return "approximate (the special-function unit)"
    if "FTZ" in mods:
        return "flushes subnormals to zero"
    if {"RZ", "RM", "RP"} & set(mods):  # FRND.FLOOR/.CEIL/.TRUNC are exact
        return "rounds other than to nearest even"
    return None


def problems(ops: Counter[str], problem) -> dict[str, str]:
    """{opcode: why} for every opcode in ``ops`` that ``problem`` (ptx_problem, sass_problem) flags."""
    return {op: why for op in ops if (why := problem(op))}


def ptx_functions(ptx: str) -> dict[str, str]:
    """{name: body} of every kernel (.entry) in a PTX listing."""
    return dict(re.findall(r"\.entry (\w+)\((.*?)\n}", ptx, flags=re.S))


# ptxas lowers an integer division or remainder (PTX div.u64, rem.s32, ...) to an exact sequence
# on the float units: the divisor converted rounding up, a reciprocal estimate, the quotient
# estimate truncated back to an integer, then integer corrections.
INTEGER_DIVISION_SASS = frozenset({"MUFU.RCP", "I2F.U32.RP", "I2F.U64.RP", "F2I.FTZ.U32.TRUNC.NTZ"})
_PTX_INTEGER_DIVISION = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:div|rem)\.[us](?:16|32|64)\s", re.M)
_PTX_FLOAT_RECIPROCAL = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:div|rcp|sqrt|rsqrt)\.[\w.]*f(?:16|32|64)\s", re.M)


def sass_problems(sass: str, ptx: str) -> dict[str, str]:
    """:func:`sass_problem`'s findings in one function's SASS, given that function's PTX. Where
    the PTX divides integers and has no float division, reciprocal or square root, the
    instructions of ptxas's integer division (:data:`INTEGER_DIVISION_SASS`) can only come
    from it, so they are not findings there."""
    found = problems(sass_float_ops(sass), sass_problem)
    if _PTX_INTEGER_DIVISION.search(ptx) and not _PTX_FLOAT_RECIPROCAL.search(ptx):
        found = {op: why for op, why in found.items() if op not in INTEGER_DIVISION_SASS}
    return found
