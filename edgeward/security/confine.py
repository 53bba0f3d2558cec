"""Take away what a process that reads untrusted bytes with native code does not need.

``confine_process`` is for a throwaway child that parses hostile input (a pushed model): after it,
the child keeps the memory, files and pipes it has and can compute and answer through them, and
nothing more that the kernel lets us take away without privileges:

* **Landlock** (Linux 5.13 and later, when the kernel enables it): no file or directory is opened
  for reading or writing, created, removed, renamed, truncated or executed (every filesystem access
  right the kernel knows is handled and none is granted); from ABI 4 no TCP bind or connect; from
  ABI 6 no signal to a process outside the child, no abstract unix socket.
* **seccomp** (x86-64 and AArch64): ``socket``, ``socketpair``, ``execve``, ``execveat``, ``ptrace``
  and ``process_vm_readv``/``writev`` fail with ``EPERM`` (so no UDP or unix socket either, which
  Landlock does not cover); so does every x32 system call.
* **rlimits and prctl**: no file grows (``RLIMIT_FSIZE`` 0), no core dump, a CPU limit, and no
  privileges gained through exec (``PR_SET_NO_NEW_PRIVS``, which Landlock and seccomp need).

What applied is returned (``Confinement``): a kernel without Landlock, or another architecture,
keeps the rest. Both are irreversible for the process and inherited by anything it forks.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import resource
import signal
import struct
from dataclasses import dataclass

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# Landlock (include/uapi/linux/landlock.h); the system call numbers are the same on every
# architecture (allocated after the tables were unified).
_LANDLOCK_CREATE_RULESET, _LANDLOCK_RESTRICT_SELF = 444, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
#: Filesystem access rights known at each ABI version (bit i is right i): 13 rights in ABI 1,
#: REFER in 2, TRUNCATE in 3, IOCTL_DEV in 5.
_FS_RIGHTS = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}
_NET_TCP = 0b11  # BIND_TCP | CONNECT_TCP (ABI 4)
_SCOPES = 0b11  # ABSTRACT_UNIX_SOCKET | SIGNAL (ABI 6)

# seccomp: the architecture's audit id and the numbers of the calls refused.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENIED = {
    # socket, socketpair, execve, execveat, ptrace, process_vm_readv, process_vm_writev
    "x86_64": (41, 53, 59, 322, 101, 310, 311),
    "aarch64": (198, 199, 221, 281, 117, 270, 271),
}
_X32_SYSCALL_BIT = 0x40000000
_EPERM = 1
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06


@dataclass(frozen=True)
class Confinement:
    """What ``confine_process`` could apply (the rlimits and no-new-privs always apply)."""

    landlock_abi: int  # 0: the kernel has no Landlock (or it is disabled)
    seccomp: bool

    def describe(self) -> str:
        parts = [f"Landlock ABI {self.landlock_abi}" if self.landlock_abi else "no Landlock"]
        parts.append("seccomp" if self.seccomp else "no seccomp")
        return ", ".join(parts)


def confine_process(cpu_s: float) -> Confinement:
    """Confine this process for good (module docstring); stdout and stderr go to /dev/null first,
    which the limits would otherwise leave writable. ``cpu_s`` of CPU, then SIGXCPU."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with EFBIG instead of killing it
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = max(1, math.ceil(cpu_s))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return Confinement(0, False)  # not Linux-like: the rlimits are what there is
    return Confinement(_landlock(libc), _seccomp(libc))


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers; 0 without Landlock."""
    return max(0, ctypes.CDLL(None, use_errno=True).syscall(_LANDLOCK_CREATE_RULESET, None, 0, 1))


def seccomp_supported() -> bool:
    """Whether ``confine_process`` installs its seccomp filter on this architecture."""
    return platform.machine() in _AUDIT_ARCH


def _landlock(libc: ctypes.CDLL) -> int:
    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0
    fs = (1 << _FS_RIGHTS[min(abi, 5)]) - 1
    if abi >= 6:
        attr = struct.pack("=QQQ", fs, _NET_TCP, _SCOPES)
    elif abi >= 4:
        attr = struct.pack("=QQ", fs, _NET_TCP)
    else:
        attr = struct.pack("=Q", fs)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(_LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(len(attr)), 0)
    if ruleset < 0:
        return 0
    try:
        if libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            return 0
    finally:
        os.close(ruleset)
    return int(abi)


def _seccomp(libc: ctypes.CDLL) -> bool:
    machine = platform.machine()
    if machine not in _AUDIT_ARCH:
        return False
    program = _filter(_AUDIT_ARCH[machine], _DENIED[machine])
    filters = (ctypes.c_uint64 * len(program))(*program)

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    fprog = SockFprog(len(program), ctypes.addressof(filters))
    return bool(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0)


def _filter(arch: int, denied: tuple[int, ...]) -> list[int]:
    """A classic BPF program (each instruction packed as ``struct sock_filter``): calls of another
    architecture (or x32) and the ``denied`` ones fail with EPERM, the rest are allowed."""
    errno = _SECCOMP_RET_ERRNO | _EPERM
    n = len(denied)
    # 0: load arch; 1: arch? else -> deny; 2: load nr; 3: x32? -> deny; 4..4+n-1: nr == d? -> deny;
    # 4+n: allow; 5+n: deny.
    deny_at = 5 + n
    program = [
        _insn(_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        _insn(_BPF_JEQ_K, 0, deny_at - 2, arch),
        _insn(_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        _insn(_BPF_JGE_K, deny_at - 4, 0, _X32_SYSCALL_BIT),
    ]
    for i, nr in enumerate(denied):
        program.append(_insn(_BPF_JEQ_K, deny_at - (4 + i) - 1, 0, nr))
    program.append(_insn(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    program.append(_insn(_BPF_RET_K, 0, 0, errno))
    return program


def _insn(code: int, jt: int, jf: int, k: int) -> int:
    return int.from_bytes(struct.pack("=HBBI", code, jt, jf, k), "little")
