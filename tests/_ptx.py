"""A tiny emulator of the PTX subset lowbit's Triton kernels inline (b32 integer and bit ops,
``prmt``, ``lop3``, ``bfe``, half/float conversions, ``shfl.sync.idx`` and ``ld.global.nc`` over
a warp), so CPU tests can check GPU-only instruction sequences against the tables they encode."""

from __future__ import annotations

import re
import struct

M32 = 0xFFFFFFFF


def prmt(a: int, b: int, sel: int) -> int:
    """``prmt.b32`` default mode: result byte i = byte ``s & 7`` of {b, a}, s = selector nibble i;
    with bit 3 of s set, the selected byte's sign bit replicated over the byte."""
    src = [(a >> 8 * i) & 255 for i in range(4)] + [(b >> 8 * i) & 255 for i in range(4)]
    out = 0
    for i in range(4):
        s = (sel >> 4 * i) & 15
        v = src[s & 7]
        out |= ((255 if v & 128 else 0) if s & 8 else v) << 8 * i
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for i in range(32):
        idx = ((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1)
        out |= ((lut >> idx) & 1) << i
    return out


def f16_to_f32(h: int) -> float:
    return struct.unpack("<e", struct.pack("<H", h & 0xFFFF))[0]


def _f16x2(op, *words: int) -> int:
    """A ``.f16x2`` instruction on two halves: each half computed by numpy in float16 (one
    rounding, as the hardware does for add/sub/mul; fma is rounded once from float64)."""
    import numpy as np

    out = 0
    for sh in (0, 16):
        h = [np.array([(w >> sh) & 0xFFFF], dtype=np.uint16).view(np.float16)[0] for w in words]
        if op == "add":
            r = h[0] + h[1]
        elif op == "sub":
            r = h[0] - h[1]
        elif op == "mul":
            r = h[0] * h[1]
        else:  # fma.rn
            r = np.float16(float(h[0]) * float(h[1]) + float(h[2]))
        out |= int(np.array([r], dtype=np.float16).view(np.uint16)[0]) << sh
    return out


def run_warp(asm: str, args: list[list[int]] | list[int], *, lanes: int = 1, memory: dict[int, int] | None = None):
    """Run ``asm`` (one inline-asm block; ``$i`` operands) on ``lanes`` lanes. ``args``: the
    operand values ``$0..`` (outputs first; a list per lane, or one list for every lane); ``memory``:
    32-bit words by byte address for ``ld.global.nc``. Returns each lane's operand list after."""
    body = [ln.strip() for ln in asm.strip().strip("{}").splitlines()]
    body = [ln.rstrip(";") for ln in body if ln and not ln.startswith(".reg") and ln not in ("{", "}")]
    per_lane = [list(a) for a in args] if args and isinstance(args[0], list) else [list(args) for _ in range(lanes)]
    regs: list[dict[str, int]] = [{} for _ in per_lane]

    def val(lane, tok):
        tok = tok.strip()
        if tok.startswith("$"):
            return per_lane[lane][int(tok[1:])]
        if tok == "%laneid":
            return lane
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok):
            return int(tok, 0) & M32
        return regs[lane][tok]

    def put(lane, tok, v):
        tok = tok.strip()
        if tok.startswith("$"):
            per_lane[lane][int(tok[1:])] = v
        else:
            regs[lane][tok] = v

    for line in body:
        op, _, rest = line.partition(" ")
        ops = [t.strip() for t in re.split(r",(?![^{]*})", rest)]
        if op == "shfl.sync.idx.b32":  # every lane's source value first
            src = [val(lane, ops[1]) for lane in range(len(per_lane))]
            for lane in range(len(per_lane)):
                put(lane, ops[0], src[val(lane, ops[2]) & 31])
            continue
        for lane in range(len(per_lane)):
            def v(i, lane=lane, ops=ops):
                return val(lane, ops[i])

            if op in ("mov.b32", "mov.u32") and ops[0].startswith("{"):  # {h0, h1} = halves of a b32
                h0, h1 = ops[0].strip("{}").split(",")
                put(lane, h0, v(1) & 0xFFFF)
                put(lane, h1, v(1) >> 16)
            elif op in ("mov.b32", "mov.u32"):
                put(lane, ops[0], v(1))
            elif op == "and.b32":
                put(lane, ops[0], v(1) & v(2))
            elif op == "or.b32":
                put(lane, ops[0], v(1) | v(2))
            elif op == "xor.b32":
                put(lane, ops[0], v(1) ^ v(2))
            elif op == "shl.b32":
                put(lane, ops[0], (v(1) << v(2)) & M32)
            elif op == "shr.u32":
                put(lane, ops[0], v(1) >> v(2))
            elif op in ("add.u32", "add.s32"):
                put(lane, ops[0], (v(1) + v(2)) & M32)
            elif op == "bfe.u32":
                put(lane, ops[0], (v(1) >> v(2)) & ((1 << v(3)) - 1))
            elif op == "prmt.b32":
                put(lane, ops[0], prmt(v(1), v(2), v(3)))
            elif op == "lop3.b32":
                put(lane, ops[0], lop3(v(1), v(2), v(3), v(4)))
            elif op in ("add.f16x2", "sub.f16x2", "mul.f16x2"):
                put(lane, ops[0], _f16x2(op.split(".")[0], v(1), v(2)))
            elif op == "fma.rn.f16x2":
                put(lane, ops[0], _f16x2("fma", v(1), v(2), v(3)))
            elif op == "cvt.f32.f16":
                put(lane, ops[0], f16_to_f32(v(1)))
            elif op == "mul.wide.u32":
                put(lane, ops[0], v(1) * v(2))
            elif op == "add.s64":
                put(lane, ops[0], v(1) + v(2))
            elif op == "ld.global.nc.b32":
                put(lane, ops[0], memory[val(lane, ops[1].strip("[]"))])
            else:
                # an instruction this emulator has no model of: refuse rather than guess its result
                raise ValueError(f"tests/_ptx.py: no model of the PTX instruction {op!r}")
    return per_lane
