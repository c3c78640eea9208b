"""The int8 SAD kernel (`sad.c`): compiled at first use, cached on disk, loaded with ctypes.

Why compile at first use (DESIGN.md section 7): the README's two commands (`pip install
torch==2.13.0 && pip install -e .`) must keep working on a fresh machine, and a build step at
install would need torch's headers in pip's isolated build, which is where pip fetches a
(CUDA) torch. The kernel is plain C with no torch headers, so the system C compiler builds it in
about a second, as the CPU float path does with inductor.

- Compiler: ``$CC`` if set (split like a shell word list, so "ccache gcc" works), else ``cc``,
  else ``gcc``; flags `BASE_FLAGS` plus the variant's `ISA_FLAGS`.
- Cache: ``<triton_adder cache dir>/int8/sad-<variant>-<hash>.so`` (the directory is
  `triton_adder.autotune.lookup.cache_dir()`: ``$TRITON_ADDER_CACHE_DIR``, else XDG). The hash
  covers the source, the flags and the compiler's ``--version`` output, so an edited source or
  another compiler never loads a stale library. The compiler writes a private temporary file that
  `os.replace` then renames into place, so two processes compiling at once each load a complete
  library (the last rename wins; both files are the same build).
- Variant: ``$TRITON_ADDER_INT8_ISA`` (`ISA_ENV`) = avx512bw | avx2 | portable forces one (an ISA
  this CPU lacks is an error); unset, empty or "auto" takes the best this CPU has. The CPU's
  features come from the flags line of /proc/cpuinfo, which Linux prints only for features the
  kernel has enabled (AVX-512 state saved by XSAVE), the same test `__builtin_cpu_supports` makes,
  without compiling a probe first; anywhere else (no /proc/cpuinfo, not x86) the portable variant.
- ARM and other CPUs get the portable variant: the same blocked loops, with a plain
  ``s += abs(a[k] - b[k])`` inner loop over bytes compiled at -O3. On x86-64 GCC 12 turns it into
  SSE2 PSADBW (checked in this library's disassembly); on AArch64 GCC's vectoriser has the same
  sum-of-absolute-differences pattern (NEON absolute-difference-and-accumulate instructions),
  which nobody has compiled or timed for this project.
- No working compiler: `load` warns once (naming the compiler and its error) and returns None;
  `QuantizedAdder2d` then computes the same integer sums through the float adder path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

ISA_ENV = "TRITON_ADDER_INT8_ISA"
COMPILER_ENV = "CC"
ISAS = ("avx512bw", "avx2", "portable")
"""The compiled variants, best first."""
ISA_CPU_FLAGS = {"avx512bw": ("avx512f", "avx512bw"), "avx2": ("avx2",), "portable": ()}
ISA_FLAGS = {"avx512bw": ("-mavx512f", "-mavx512bw"), "avx2": ("-mavx2",), "portable": ()}
IFMA_ENV = "TRITON_ADDER_INT8_IFMA"
"""0 builds the AVX-512BW variant without AVX512-IFMA even where the CPU has it (tests, A/B timing)."""
ISA_CODES = {"portable": 0, "avx2": 1, "avx512bw": 2}
"""What the library's ``ta_isa()`` returns for each variant (the loader checks the build is the one asked for)."""
BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
SOURCE = Path(__file__).with_name("sad.c")
COMPILE_TIMEOUT_S = 120

MICRO_MR = (1, 2, 3, 4, 6, 8)
MICRO_NR = (8, 16, 24, 32)
"""The register blocks `sad.c` compiles: mr positions x nr output channels (8 per weight group)."""
K_MULTIPLE = 8
"""Each operand row is padded to a multiple of this many bytes (one VPSADBW lane) with byte 128 in both."""
CHANNEL_GROUP = 8
"""Output channels per weight group (one zmm of 8 lanes); channels per group of the layer are padded to it."""
OUT_F32, OUT_F64, OUT_I32 = 0, 1, 2


@dataclass(frozen=True)
class Blocking:
    """The kernel's blocking: mr positions x nr output channels in registers (mr * nr/8 zmm
    accumulators, twice as many ymm), mc positions x nc channels per task (an int32 tile), kc bytes
    of K per chunk. mr in `MICRO_MR`, nr in `MICRO_NR`; mc a multiple of mr; nc of 8; kc of 8.
    threads: the most OpenMP threads one call uses (None: ``torch.get_num_threads()``; a layer never
    uses more than that): a small layer can run faster on fewer threads than on all of them."""

    mr: int
    nr: int
    mc: int
    nc: int
    kc: int
    threads: int | None = None

    def check(self, argument: str = "blocking") -> Blocking:
        """self, or a ValueError naming `argument` and what is accepted."""
        for name in ("mr", "nr", "mc", "nc", "kc", "threads"):
            value = getattr(self, name)
            if name == "threads" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{argument}.{name} must be a positive int, got {value!r}")
        if self.mr not in MICRO_MR or self.nr not in MICRO_NR:
            raise ValueError(
                f"{argument}: mr must be one of {MICRO_MR} and nr one of {MICRO_NR}, got mr={self.mr}, nr={self.nr}"
            )
        if self.mc % self.mr or self.nc % CHANNEL_GROUP or self.kc % K_MULTIPLE:
            raise ValueError(
                f"{argument}: mc must be a multiple of mr, nc of {CHANNEL_GROUP} and kc of {K_MULTIPLE}, got {self}"
            )
        return self


DEFAULT_BLOCKING = {
    # 4 positions x 32 channels: 16 zmm accumulators + 4 weight vectors + 1 broadcast = 21 of 32
    # registers; a 64 x 64 int32 tile (16 KiB); 32 channels x 1 KiB of K = 32 KiB of weight per chunk.
    "avx512bw": Blocking(mr=4, nr=32, mc=64, nc=64, kc=1024),
    # 16 ymm registers: 6 positions x 8 channels = 12 accumulators + 2 weight vectors + 1 broadcast.
    "avx2": Blocking(mr=6, nr=8, mc=96, nc=64, kc=1024),
    "portable": Blocking(mr=4, nr=8, mc=64, nc=64, kc=1024),
}
"""Default blocking per variant: the one place a tuner's winner would replace (issue 27)."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports in /proc/cpuinfo (empty where there is none); read once."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isas() -> tuple[str, ...]:
    """The variants this CPU can run, best first ("portable" always)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    flags = cpu_flags() if x86 else frozenset()
    return tuple(isa for isa in ISAS if all(flag in flags for flag in ISA_CPU_FLAGS[isa]))


def requested_isa() -> str | None:
    """The variant forced by $TRITON_ADDER_INT8_ISA, or None (auto); a ValueError for anything else."""
    raw = os.environ.get(ISA_ENV, "").strip()
    if raw in ("", "auto"):
        return None
    if raw not in ISAS:
        raise ValueError(f"{ISA_ENV} must be one of {', '.join(ISAS)} or auto (unset), got {raw!r}")
    return raw


def selected_isa() -> str:
    """The variant to run: the forced one (a RuntimeError if this CPU lacks it), else the best available."""
    available = cpu_isas()
    forced = requested_isa()
    if forced is None:
        return available[0]
    if forced not in available:
        raise RuntimeError(
            f"{ISA_ENV}={forced} but this CPU lacks {'/'.join(ISA_CPU_FLAGS[forced])} (it runs: {', '.join(available)})"
        )
    return forced


def isa_flags(isa: str) -> tuple[str, ...]:
    """The compiler flags of variant `isa`: `ISA_FLAGS`, plus -mavx512ifma for AVX-512BW on a CPU with
    AVX512-IFMA (unless $TRITON_ADDER_INT8_IFMA is 0), which makes sad.c accumulate with VPMADD52LUQ."""
    flags = ISA_FLAGS[isa]
    if isa == "avx512bw" and "avx512ifma" in cpu_flags() and os.environ.get(IFMA_ENV, "").strip() != "0":
        flags += ("-mavx512ifma",)
    return flags


def compiler_command() -> list[str]:
    """The C compiler: $CC (split as shell words), else cc, else gcc (the first on PATH)."""
    raw = os.environ.get(COMPILER_ENV, "").strip()
    if raw:
        return shlex.split(raw)
    for name in ("cc", "gcc"):
        if shutil.which(name):
            return [name]
    return ["cc"]


_versions: dict[tuple[str, ...], str] = {}


def compiler_version(command: list[str]) -> str:
    """`command --version` (memoised): part of the cache key. Raises OSError/CalledProcessError if it does not run."""
    key = tuple(command)
    if key not in _versions:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30, check=True)
        _versions[key] = done.stdout
    return _versions[key]


def cache_directory() -> Path:
    """Where compiled libraries go: <triton_adder cache dir>/int8 (`autotune.lookup.cache_dir`)."""
    from triton_adder.autotune.lookup import cache_dir  # noqa: PLC0415  (imports the tuner; only when needed)

    return cache_dir() / "int8"


def library_path(isa: str, command: list[str]) -> Path:
    """The cached library of `isa` built by `command`: named by a hash of source, flags and compiler version."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(repr((BASE_FLAGS, isa_flags(isa), command)).encode())
    digest.update(compiler_version(command).encode())
    return cache_directory() / f"sad-{isa}-{digest.hexdigest()[:20]}.so"


compile_count = 0
"""How many libraries this process has compiled (tests read it)."""


def build(isa: str) -> Path:
    """The path of `isa`'s library, compiling it first if the cache lacks it. Raises on failure."""
    global compile_count
    command = compiler_command()
    path = library_path(isa, command)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(handle)
    try:
        done = subprocess.run(
            [*command, *BASE_FLAGS, *isa_flags(isa), "-o", temporary, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(temporary, path)  # atomic: another process sees no file or a complete one
        compile_count += 1
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


class Library:
    """One loaded variant: typed ctypes entry points of `sad.c`."""

    def __init__(self, path: Path, isa: str):
        self.path, self.isa = path, isa
        lib = ctypes.CDLL(str(path))
        i64, i32, ptr, f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_double
        lib.ta_isa.restype = i32
        lib.ta_isa.argtypes = []
        for name in ("ta_quantize_f32", "ta_quantize_f64"):
            getattr(lib, name).restype = None
            getattr(lib, name).argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, i64, f64, ptr, i32]
        lib.ta_im2col.restype = None
        lib.ta_im2col.argtypes = [ptr, *[i64] * 17, ptr, i32]
        lib.ta_sad_forward.restype = i32
        lib.ta_sad_forward.argtypes = [
            ptr,
            i64,
            i64,
            ptr,
            i64,
            i64,
            i64,
            i64,
            i64,
            ptr,
            i32,
            i64,
            i64,
            i64,
            ptr,
            ptr,
            i32,
            i32,
            i64,
            i64,
            i64,
            i32,
        ]
        if lib.ta_isa() != ISA_CODES[isa]:
            raise RuntimeError(
                f"{path} reports ISA code {lib.ta_isa()}, expected {ISA_CODES[isa]} ({isa}): "
                f"the compiler ignored {isa_flags(isa)}"
            )
        self.lib = lib


_lock = threading.Lock()
_loaded: dict[tuple, Library | str] = {}
"""(variant, compiler, cache dir) -> the library, or the error text of a failed build (warned once)."""


_by_environment: dict[tuple, Library | None] = {}
"""The settings `load` reads -> its answer: after the first call a layer call costs one dict probe."""


def _settings() -> tuple:
    from triton_adder.autotune.lookup import CACHE_DIR_ENV  # noqa: PLC0415

    names = (ISA_ENV, IFMA_ENV, COMPILER_ENV, CACHE_DIR_ENV, "XDG_CACHE_HOME", "HOME")
    return tuple(os.environ.get(name) for name in names)


def load() -> Library | None:
    """The selected variant's library, compiled on first use; None (after one warning) if it cannot be built.

    A bad $TRITON_ADDER_INT8_ISA, or one naming an ISA this CPU lacks, raises instead: that is a
    setting to fix, not a missing compiler.
    """
    settings = _settings()
    if settings in _by_environment:
        return _by_environment[settings]
    isa = selected_isa()
    command = compiler_command()
    key = (isa, isa_flags(isa), tuple(command), str(cache_directory()))
    with _lock:
        found = _loaded.get(key)
        if found is None:
            try:
                found = Library(build(isa), isa)
            except (OSError, subprocess.SubprocessError, RuntimeError) as error:
                found = f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"triton_adder int8: could not build the {isa} SAD kernel with C compiler {shlex.join(command)!r} "
                    f"(set ${COMPILER_ENV} to choose another): {found}. Quantized adder layers compute the same "
                    "integer sums through the float adder path instead (slower).",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _loaded[key] = found
        result = found if isinstance(found, Library) else None
        _by_environment[settings] = result
    return result


def clear() -> None:
    """Forget loaded libraries, failed builds and compiler versions (tests call it after changing the environment)."""
    with _lock:
        _loaded.clear()
        _by_environment.clear()
        _versions.clear()
