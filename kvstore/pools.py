"""Preallocated KV storage of the two local tiers, and batched copies between them.

T0 (``DevicePool``) lives on the worker's device and is layer-first, the layout attention
reads: ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``.
T1 (``HostPool``) lives in host memory, pinned when CUDA is present, and is block-first
("page-first"): ``[num_blocks, layers, 2, block_size, kv_heads, head_dim]``, so that one
block is one contiguous buffer for the codec and the wire.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvstore.spec import KVSpec


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DevicePool:
    """T0: hot KV blocks on the worker's device, addressed by slot."""

    def __init__(self, spec: KVSpec, num_blocks: int, device: str | torch.device | None = "auto"):
        if num_blocks <= 0:
            raise ValueError(f"T0 needs at least one block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = resolve_device(device)
        L, two, bs, h, d = spec.block_shape
        self.kv = torch.zeros((L, two, num_blocks, bs, h, d), dtype=spec.dtype, device=self.device)
        # Byte view for copies on background threads (CPU only), see spill(background=True).
        self.bytes = self.kv.view(torch.uint8).numpy() if self.device.type == "cpu" else None
        self._copy_stream = None  # CUDA: background restores, off the compute stream

    def copy_stream(self):
        """The CUDA stream of background host-to-device copies (created on first use)."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream

    def block(self, slot: int) -> torch.Tensor:
        """View of one block, ``[layers, 2, block_size, kv_heads, head_dim]`` (strided)."""
        return self.kv[:, :, slot]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class HostPool:
    """T1: warm KV blocks in host memory, one contiguous buffer per block."""

    def __init__(self, spec: KVSpec, num_blocks: int, pin: bool | None = None):
        if num_blocks <= 0:
            raise ValueError(f"T1 needs at least one block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        pin = torch.cuda.is_available() if pin is None else pin
        self.kv = torch.zeros((num_blocks, *spec.block_shape), dtype=spec.dtype, pin_memory=pin)
        self.bytes = self.kv.view(torch.uint8).numpy()  # [num_blocks, ..., head_dim * itemsize]
        self._flat = self.bytes.reshape(num_blocks, -1)

    def block(self, slot: int) -> torch.Tensor:
        return self.kv[slot]

    def block_bytes(self, slot: int) -> np.ndarray:
        """Flat uint8 numpy view of one block: what the codec reads and decodes into."""
        return self._flat[slot]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def _runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split slot pairs into runs where both sides are consecutive: (src0, dst0, length)."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            s0, d0, n = runs[-1]
            runs[-1] = (s0, d0, n + 1)
        else:
            runs.append((s, d, 1))
    return runs


def spill(t0: DevicePool, t1: HostPool, t0_slots: Sequence[int], t1_slots: Sequence[int],
          background: bool = False) -> None:
    """Copy blocks T0 -> T1 (device to host). Returns when the copy is complete.

    ``background``: called off the compute thread. On CPU the copy then goes through numpy,
    single-threaded: a torch copy there opens a second OpenMP team that fights the model's
    for the cores."""
    if len(t0_slots) != len(t1_slots):
        raise ValueError("spill needs as many destination slots as source slots")
    if not t0_slots:
        return
    runs = _runs(t0_slots, t1_slots)
    if t0.device.type == "cuda":
        # Gather on the device (fast), then one DMA per run into pinned memory.
        for s, d, n in runs:
            staged = t0.kv[:, :, s:s + n].permute(2, 0, 1, 3, 4, 5).contiguous()
            t1.kv[d:d + n].copy_(staged, non_blocking=True)
        torch.cuda.current_stream(t0.device).synchronize()
    elif background and t0.bytes is not None:  # a CPU T0 (numpy views); other devices below
        for s, d, n in runs:
            np.copyto(t1.bytes[d:d + n], np.moveaxis(t0.bytes[:, :, s:s + n], 2, 0))
    else:
        # One strided copy per run: a single pass over the bytes. (index_select +
        # index_copy_ makes two passes and measured ~10x slower here.)
        for s, d, n in runs:
            t1.kv[d:d + n].copy_(t0.kv[:, :, s:s + n].permute(2, 0, 1, 3, 4, 5))


def restore(t1: HostPool, t0: DevicePool, t1_slots: Sequence[int], t0_slots: Sequence[int],
            background: bool = False) -> None:
    """Copy blocks T1 -> T0 (host to device). Returns when the copy is complete.

    ``background``: called off the compute thread (prefix loads). On CUDA the copies then go
    on the pool's own stream and an event marks their end, so they overlap the model's
    kernels; on CPU they go through numpy (no second OpenMP team, see ``spill``)."""
    if len(t0_slots) != len(t1_slots):
        raise ValueError("restore needs as many destination slots as source slots")
    if not t0_slots:
        return
    runs = _runs(t1_slots, t0_slots)
    if t0.device.type == "cuda":
        stream = t0.copy_stream() if background else torch.cuda.current_stream(t0.device)
        with torch.cuda.stream(stream):
            # One DMA per run of contiguous host blocks, then a permute on the device.
            for s, d, n in runs:
                staged = t1.kv[s:s + n].to(t0.device, non_blocking=True)
                t0.kv[:, :, d:d + n].copy_(staged.permute(1, 2, 0, 3, 4, 5))
            done = torch.cuda.Event()
            done.record(stream)
        # The host slots may be overwritten by the CPU right after we return.
        done.synchronize()
    elif background and t0.bytes is not None:
        for s, d, n in runs:
            np.copyto(np.moveaxis(t0.bytes[:, :, d:d + n], 2, 0), t1.bytes[s:s + n])
    else:
        for s, d, n in runs:
            t0.kv[:, :, d:d + n].copy_(t1.kv[s:s + n].permute(1, 2, 0, 3, 4, 5))
