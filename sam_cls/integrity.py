"""What makes a checkpoint trustworthy: a checksum over all of it, and the generation it is of which run.

torch.load checks neither tensor data nor the plain values around them, so a flipped byte in a class name or
in the stored config would be served as it reads. state_crc32 covers every key and value (tensors by dtype,
shape and bytes), so any edit is found on load. A generation (a number that grows with each commit, the run's
id, and the operation that made it) names a checkpoint: a writer that loaded generation n may commit only over
generation n, and a fallback to the previous file says which generation of which run it is.
"""

from __future__ import annotations

import struct
import uuid
import zlib

import torch

CHECKSUM_KEY = "state_crc32"  # a checkpoint's checksum of all its other keys and values
LEGACY_CHECKSUM_KEY = "tensors_crc32"  # what checkpoints before state_crc32 carried: their tensors' bytes only


def _tensor_bytes(t: torch.Tensor):
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def state_crc32(obj, crc: int = 0, top: bool = True) -> int:
    """CRC-32 of a nested state: every key, value, type, tensor dtype, shape and byte, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        crc = zlib.crc32(f"T{obj.dtype}{tuple(obj.shape)}".encode(), crc)
        return zlib.crc32(_tensor_bytes(obj), crc)
    if isinstance(obj, dict):
        keys = [k for k in obj if not (top and k in (CHECKSUM_KEY, LEGACY_CHECKSUM_KEY))]
        crc = zlib.crc32(b"D%d" % len(keys), crc)
        for key in sorted(keys, key=lambda k: (type(k).__name__, str(k))):
            crc = state_crc32(obj[key], state_crc32(key, crc, False), False)
        return crc
    if isinstance(obj, list | tuple):
        crc = zlib.crc32((b"L%d" if isinstance(obj, list) else b"U%d") % len(obj), crc)
        for item in obj:
            crc = state_crc32(item, crc, False)
        return crc
    if isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        return zlib.crc32(b"S%d:" % len(data) + data, crc)
    if isinstance(obj, bytes | bytearray):
        return zlib.crc32(b"B%d:" % len(obj) + bytes(obj), crc)
    if isinstance(obj, bool) or obj is None:
        return zlib.crc32(repr(obj).encode(), crc)
    if isinstance(obj, int):
        return zlib.crc32(b"I%d;" % obj, crc)
    if isinstance(obj, float):
        return zlib.crc32(b"F" + struct.pack("<d", obj), crc)
    return zlib.crc32(f"R{type(obj).__name__}:{obj!r}".encode(), crc)  # a torch.dtype, say


def tensors_crc32(obj, crc: int = 0) -> int:
    """The checksum checkpoints before state_crc32 carried: tensor bytes and dict keys only (kept to read them)."""
    if isinstance(obj, torch.Tensor):
        return zlib.crc32(_tensor_bytes(obj), crc)
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            if key not in (CHECKSUM_KEY, LEGACY_CHECKSUM_KEY):
                crc = tensors_crc32(obj[key], zlib.crc32(str(key).encode(), crc))
    elif isinstance(obj, list | tuple):
        for item in obj:
            crc = tensors_crc32(item, crc)
    return crc


def seal(state: dict) -> dict:
    """The state with its checksum, as it is saved."""
    state = {k: v for k, v in state.items() if k not in (CHECKSUM_KEY, LEGACY_CHECKSUM_KEY)}
    return {**state, CHECKSUM_KEY: state_crc32(state)}


def verify(state: dict) -> str | None:
    """Why a loaded state is not what was saved (None when it is): any damage, in tensors or anywhere else."""
    try:
        if CHECKSUM_KEY in state:
            ok = state[CHECKSUM_KEY] == state_crc32(state)
        elif LEGACY_CHECKSUM_KEY in state:
            ok = state[LEGACY_CHECKSUM_KEY] == tensors_crc32(state)
        else:
            return None  # a checkpoint from before checksums
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:  # a tensor whose view is broken
        return f"checksum cannot be computed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None if ok else "checksum mismatch"


def checksum(state: dict) -> int | None:
    return state.get(CHECKSUM_KEY, state.get(LEGACY_CHECKSUM_KEY))


# ------------------------------------------------------------------------------------------------ generations
def generation(state: dict | None) -> dict:
    """A committed state's generation: number, run id and operation ({} for a checkpoint from before them)."""
    gen = (state or {}).get("generation")
    return gen if isinstance(gen, dict) else {}


def identity(state: dict | None) -> tuple | None:
    """What tells one committed checkpoint from any other: its generation and its checksum (None: no state)."""
    if state is None:
        return None
    gen = generation(state)
    return gen.get("number"), gen.get("run"), checksum(state)


def next_generation(after: dict | None, op: str | None = None) -> dict:
    """The generation a commit over `after` (a state, or None for a new run) makes."""
    gen = generation(after)
    return {"number": int(gen.get("number") or 0) + 1, "run": gen.get("run") or uuid.uuid4().hex[:12], "op": op}


def describe(state: dict | None, name: str = "") -> str:
    """`checkpoint.pt (generation 4 of run 3f2a..., epoch 2, step 20)`: how messages name a generation."""
    gen = generation(state)
    parts = [f"generation {gen['number']} of run {gen.get('run')}"] if "number" in gen else []
    if state is not None and "epoch" in state:
        parts.append(f"epoch {state.get('epoch')}, step {state.get('step')}")
    return f"{name} ({', '.join(parts)})" if parts else name
