"""Take away what a process that reads untrusted bytes with native code does not need.

``confine_process`` is for a throwaway child that parses hostile input (a pushed model): after it,
the child keeps the memory, files and pipes it has and can compute and answer through them, and
nothing more that the kernel lets us take away without privileges:

* **Landlock** (Linux 5.13 and later, when the kernel enables it): no file or directory is opened
  for reading or writing, created, removed, renamed, truncated or executed (every filesystem access
  right of ABI 1 to 7 is handled and none is granted; rights of later ABIs are not handled); from
  ABI 4 no TCP bind or connect; from ABI 6 no signal to a process outside the child, no abstract
  unix socket.
* **seccomp** (a 64-bit interpreter on x86-64 or AArch64), whatever Landlock does: no file is
  opened for writing (``open``/``openat`` with a write, create, truncate or append flag), created,
  linked, renamed, removed, truncated, re-permissioned (``chmod``, ``chown``), given extended
  attributes or new times; no socket at all (``socket``, ``socketpair``, and ``io_uring``, which
  can make one without them: so no UDP or unix socket, which Landlock does not cover); no program
  run (``execve``, ``execveat``); no other process traced, read, written, signalled or limited
  (``ptrace``, ``process_vm_*``, ``pidfd_*``, ``setpriority``, ``ioprio_set``, ``migrate_pages``,
  ``move_pages``, ``process_madvise``; ``kill``, ``tkill``, ``tgkill`` and the ``sigqueueinfo``
  calls only to the child itself, so ``abort`` still works; ``prlimit64`` and the ``sched_set*``
  calls only on itself; ``fcntl`` sets no signal owner). Each fails with ``EPERM``, as does every
  x32 system call. The filter covers every thread of the process (``SECCOMP_FILTER_FLAG_TSYNC``).
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
import sys
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

# seccomp: the architecture's audit id and its system call numbers (arch/x86/entry/syscalls,
# include/uapi/asm-generic/unistd.h; AArch64 has no open, unlink, rename, chmod... of its own).
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# fmt: off
_DENIED = {
    "x86_64": (
        41, 53, 59, 322, 101, 310, 311, 425, 426, 427, 424, 434, 437, 438,  # sockets, exec, io_uring, others, openat2
        141, 251, 256, 279, 440,  # setpriority, ioprio_set, migrate_pages, move_pages, process_madvise
        85, 87, 263, 84, 82, 264, 316, 86, 265, 88, 266, 83, 258, 133, 259,  # create, remove, rename, link
        76, 77, 90, 91, 268, 452, 92, 93, 94, 260,  # truncate, chmod, chown
        188, 189, 190, 197, 198, 199, 463, 466, 132, 235, 280, 261,  # xattrs, times
    ),
    "aarch64": (
        198, 199, 221, 281, 117, 270, 271, 425, 426, 427, 424, 434, 437, 438,
        140, 30, 238, 239, 440,
        35, 38, 276, 37, 36, 34, 33,
        45, 46, 52, 53, 452, 54, 55,
        5, 6, 7, 14, 15, 16, 463, 466, 88,
    ),
}
#: Signal senders, allowed only with the child's own pid as their first argument: kill, tkill,
#: tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo.
_SELF_ONLY = {"x86_64": (62, 200, 234, 129, 297), "aarch64": (129, 130, 131, 138, 240)}
#: Calls on a process given by pid, where 0 is the caller: prlimit64, sched_setparam,
#: sched_setscheduler, sched_setaffinity, sched_setattr (RLIMIT_CPU of 1 s would kill another).
_SELF_OR_ZERO = {"x86_64": (302, 142, 144, 203, 314), "aarch64": (261, 118, 119, 122, 274)}
# fmt: on
#: fcntl, refused with F_SETOWN (8) or F_SETOWN_EX (15): SIGIO (or any F_SETSIG signal) to another.
_FCNTL = {"x86_64": 72, "aarch64": 25}
_FCNTL_SETOWN = (8, 15)
#: (call, index of its flags argument): open (x86-64 only) and openat.
_OPENS = {"x86_64": ((2, 1), (257, 2)), "aarch64": ((56, 2),)}
#: seccomp(2), to install the filter on every thread of the process (SECCOMP_FILTER_FLAG_TSYNC).
_SECCOMP_CALL = {"x86_64": 317, "aarch64": 277}
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC = 1, 1
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_X32_SYSCALL_BIT = 0x40000000
_EPERM = 1
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_BPF_LD_W_ABS, _BPF_RET_K = 0x20, 0x06
_BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K = 0x15, 0x35, 0x45
# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6] (low word first).
_NR, _ARCH, _ARGS = 0, 4, 16


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
    """Whether ``confine_process`` installs its seccomp filter here: a 64-bit interpreter on x86-64
    or AArch64 (a 32-bit one on a 64-bit kernel makes its calls under another architecture)."""
    return platform.machine() in _AUDIT_ARCH and sys.maxsize > 2**32


def _landlock(libc: ctypes.CDLL) -> int:
    """Restrict this process with the strongest ruleset the kernel takes; the ABI whose rules
    applied (a kernel without networking refuses the network rights: then the scopes alone, then
    the filesystem alone), 0 for none."""
    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0
    fs = (1 << _FS_RIGHTS[min(abi, 5)]) - 1
    attempts: list[tuple[bytes, int]] = []
    if abi >= 6:
        attempts += [
            (struct.pack("=QQQ", fs, _NET_TCP, _SCOPES), abi),
            (struct.pack("=QQQ", fs, 0, _SCOPES), 6),
        ]
    if abi >= 4:
        attempts.append((struct.pack("=QQ", fs, _NET_TCP), min(abi, 5)))
    attempts.append((struct.pack("=Q", fs), min(abi, 3)))
    for attr, applied in attempts:  # noqa: B007 - the one that took is returned below
        buffer = ctypes.create_string_buffer(attr, len(attr))
        ruleset = libc.syscall(_LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(len(attr)), 0)
        if ruleset >= 0:
            break
    else:
        return 0
    try:
        if libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            return 0
    finally:
        os.close(ruleset)
    return int(applied)


def _seccomp(libc: ctypes.CDLL) -> bool:
    if not seccomp_supported():
        return False
    m = platform.machine()
    program = _filter(
        _AUDIT_ARCH[m], _DENIED[m], _SELF_ONLY[m], _SELF_OR_ZERO[m], _FCNTL[m], _OPENS[m], os.getpid()
    )
    filters = (ctypes.c_uint64 * len(program))(*program)

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    fprog = SockFprog(len(program), ctypes.addressof(filters))
    every_thread = libc.syscall(
        _SECCOMP_CALL[m], _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog)
    )
    if every_thread == 0:
        return True
    return bool(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0)


def _filter(
    arch: int,
    denied: tuple[int, ...],
    self_only: tuple[int, ...],
    self_or_zero: tuple[int, ...],
    fcntl: int,
    opens: tuple[tuple[int, int], ...],
    pid: int,
) -> list[int]:
    """A classic BPF program (each instruction packed as ``struct sock_filter``, labels resolved to
    the relative jumps BPF takes): calls of another architecture (or x32) and the ``denied`` ones
    fail with EPERM; the ``self_only`` ones unless their first argument is ``pid``, the
    ``self_or_zero`` ones unless it is ``pid`` or 0; ``fcntl`` when it sets an owner for signals;
    the ``opens`` ones when their flags ask to write; the rest are allowed."""
    code: list[tuple[int, str | int, str | int, int]] = [  # (op, jump if true, if false, k)
        (_BPF_LD_W_ABS, 0, 0, _ARCH),
        (_BPF_JEQ_K, 0, "deny", arch),
        (_BPF_LD_W_ABS, 0, 0, _NR),
        (_BPF_JGE_K, "deny", 0, _X32_SYSCALL_BIT),
        *((_BPF_JEQ_K, "deny", 0, nr) for nr in denied),
        *((_BPF_JEQ_K, "self", 0, nr) for nr in self_only),
        *((_BPF_JEQ_K, "self0", 0, nr) for nr in self_or_zero),
        (_BPF_JEQ_K, "fcntl", 0, fcntl),
        *((_BPF_JEQ_K, f"open{arg}", 0, nr) for nr, arg in opens),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ]
    labels = {"self0": len(code)}
    code += [(_BPF_LD_W_ABS, 0, 0, _ARGS), (_BPF_JEQ_K, "allow", "self_pid", 0)]
    labels["self"] = len(code)
    code.append((_BPF_LD_W_ABS, 0, 0, _ARGS))
    labels["self_pid"] = len(code)
    code.append((_BPF_JEQ_K, "allow", "deny", pid))
    labels["fcntl"] = len(code)
    code.append((_BPF_LD_W_ABS, 0, 0, _ARGS + 8))
    code += [(_BPF_JEQ_K, "deny", 0, cmd) for cmd in _FCNTL_SETOWN]
    code.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    for arg in sorted({arg for _, arg in opens}):
        labels[f"open{arg}"] = len(code)
        code += [(_BPF_LD_W_ABS, 0, 0, _ARGS + 8 * arg), (_BPF_JSET_K, "deny", "allow", _WRITE_FLAGS)]
    labels["allow"] = len(code)
    code.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    labels["deny"] = len(code)
    code.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | _EPERM))

    def offset(at: int, target: str | int) -> int:
        jump = target if isinstance(target, int) else labels[target] - at - 1
        if not 0 <= jump <= 255:
            raise ValueError(f"a BPF jump of {jump} instructions")
        return jump

    return [_insn(op, offset(i, jt), offset(i, jf), k) for i, (op, jt, jf, k) in enumerate(code)]


def _insn(code: int, jt: int, jf: int, k: int) -> int:
    return int.from_bytes(struct.pack("=HBBI", code, jt, jf, k), "little")
