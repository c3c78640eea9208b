"""The hardware bound of issue 27's goal: peak VPSADBW vs float32 FMA throughput on this CPU, one thread,
and how close float32 conv2d and our int8 SAD kernel come to them on ResNet-50 layers.

    python benchmarks/sad_peak.py [--rounds 61] [--layer-repeats 21] [--batches 1,8] [--output FILE]

1. Compiles `benchmarks/sad_peak.c` with the system C compiler ($CC, else cc) and runs it pinned to one
   core: loops of 12 independent VPSADBW / VPSADBW+VPADDQ / VPSADBW+VPMADD52LUQ / VFMADD231PS /
   VPDPBUSD (zmm and ymm), and
   a dependent chain of scalar adds for the clock, interleaved in rounds, best of --rounds runs each.
   Prints each as instructions per second and useful operations per second (byte differences for
   the SADs, multiply-adds for FMA and VNNI), and per cycle at the clock the add chain measured.
   The lowest int8-adder / conv2d time ratio at equal efficiency = (FMA MACs/s) / (SAD byte-diffs/s):
   taken with the SAD accumulated (VPSADBW + VPADDQ, or + VPMADD52LUQ: the kernel's inner pair) and bare.
2. On three ResNet-50 layer shapes, one torch thread, interleaved: F.conv2d float32 (MACs/s, against
   the FMA peak), and the int8 adder (byte differences/s, against the SAD peaks) as the whole
   QuantizedAdder2d call (quantize the input, lay it out, reduce, rescale) and as the reduction alone
   (`ta_sad_forward` with its float32 epilogue, on operands laid out beforehand).
   Useful work counts only the layer's own K = Cin * kh * kw per output, not the kernel's padding.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from triton_adder.cli_args import positive_int  # noqa: E402
from triton_adder.measure.machine import cpu_name  # noqa: E402
from triton_adder.nn import Adder2d  # noqa: E402
from triton_adder.quant import QuantizedAdder2d, native  # noqa: E402

SOURCE = Path(__file__).with_name("sad_peak.c")
KINDS = (
    "clock",
    "clock_imul",
    "sad_zmm",
    "sad_add_zmm",
    "sad_ifma_zmm",
    "sad_ymm",
    "sad_add_ymm",
    "dbpsad_zmm",
    "fma_zmm",
    "fma_ymm",
    "vnni_zmm",
)
NEEDS = {"avx512f", "avx512bw", "avx512_vnni", "avx512ifma", "fma", "avx2"}
# (name, Cin, H = W, Cout, kernel, stride, padding): ResNet-50 layers named in issue 27's follow-up
LAYERS = (
    ("64x56x56->64 3x3 s1 p1", 64, 56, 64, 3, 1, 1),
    ("256x56x56->64 1x1 s1 p0", 256, 56, 64, 1, 1, 0),
    ("512x7x7->512 3x3 s1 p1", 512, 7, 512, 3, 1, 1),
)


def run_peaks(rounds: int) -> dict[str, dict[str, float]]:
    """kind -> {instr_per_s, ops_per_s, ops_per_instr}: sad_peak.c compiled and run on one core."""
    compiler = shlex.split(os.environ.get("CC", "").strip()) or [shutil.which("cc") or "gcc"]
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "sad_peak")
        subprocess.run([*compiler, "-O2", "-mavx512f", "-o", binary, str(SOURCE)], check=True)
        command = [binary, str(rounds), *KINDS]
        if shutil.which("taskset"):
            command = ["taskset", "-c", str(sorted(os.sched_getaffinity(0))[-1]), *command]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
    peaks = {}
    for line in done.stdout.split("\n"):
        if not line.strip():
            continue
        name, ops, per_iter, iters, seconds = line.split()
        instructions = int(per_iter) * int(iters)
        peaks[name] = {
            "instr_per_s": instructions / float(seconds),
            "ops_per_s": int(ops) * instructions / float(seconds),
            "ops_per_instr": int(ops),
        }
    return peaks


def prepared_reduction(layer: QuantizedAdder2d, x: torch.Tensor):
    """A zero-argument callable running `ta_sad_forward` alone (float32 output, bias none) on the operands
    `layer` would lay out for `x` (quantized, im2col'd beforehand, as QuantizedAdder2d._native does)."""
    library = native.load()
    blocking = native.DEFAULT_BLOCKING[library.isa]
    n, c, h, w = x.shape
    kh, kw = layer.kernel_size
    (sh, sw), (ph, pw) = layer.stride, layer.padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    tg_pad, kpad = layer.padded_sizes
    threads = torch.get_num_threads()
    xq = torch.empty(n, h, w, c, dtype=torch.uint8)
    library.lib.ta_quantize_f32(x.data_ptr(), n, c, h, w, *x.stride(), 1.0 / layer.scale_value, xq.data_ptr(), threads)
    m = n * ho * wo
    m_pad = -(-m // blocking.mr) * blocking.mr
    a = torch.empty(m_pad, kpad, dtype=torch.uint8)
    library.lib.ta_im2col(
        xq.data_ptr(), n, h, w, c, 1, kh, kw, sh, sw, ph, pw, 1, 1, ho, wo, m_pad, kpad, a.data_ptr(), threads
    )
    out = torch.empty(n, layer.out_channels, ho, wo)
    s_n, s_c, _, s_w = out.stride()

    def call():
        status = library.lib.ta_sad_forward(
            a.data_ptr(), m, m_pad, layer.weight_packed.data_ptr(), layer.out_channels, tg_pad, 1, kpad,
            ho * wo, out.data_ptr(), native.OUT_F32, s_n, s_c, s_w, None, layer.scale_value,
            blocking.mr, blocking.nr, blocking.mc, blocking.nc, blocking.kc, threads,
        )  # fmt: skip
        assert status == 0, status

    call()
    reference = layer(x)
    assert torch.equal(out, reference), "the prepared reduction differs from the layer's own call"
    return call


def measure_layers(batches: list[int], repeats: int) -> list[dict]:
    rows = []
    for batch in batches:
        for name, cin, size, cout, k, stride, pad in LAYERS:
            torch.manual_seed(0)
            x = torch.randn(batch, cin, size, size)
            weight = torch.randn(cout, cin, k, k) * 0.5
            float_layer = Adder2d(cin, cout, k, stride=stride, padding=pad, bias=False)
            with torch.no_grad():
                float_layer.weight.copy_(weight)
            layer = QuantizedAdder2d.from_float(float_layer, float(x.abs().max()))
            calls = {
                "conv2d fp32": lambda x=x, w=weight, s=stride, p=pad: F.conv2d(x, w, None, s, p),
                "int8 adder layer": lambda x=x, layer=layer: layer(x),
                "int8 reduction alone": prepared_reduction(layer, x),
            }
            samples = {key: [] for key in calls}
            with torch.no_grad():
                for fn in calls.values():
                    fn()
                names = list(calls)
                for rep in range(repeats):
                    for key in names[rep % 3 :] + names[: rep % 3]:
                        start = time.perf_counter()
                        calls[key]()
                        samples[key].append(time.perf_counter() - start)
            ho = (size + 2 * pad - k) // stride + 1
            work = batch * ho * ho * cout * cin * k * k  # MACs for conv2d, byte differences for the adder
            rows.append(
                {
                    "layer": name,
                    "batch": batch,
                    "work": work,
                    **{f"{key} best s": min(v) for key, v in samples.items()},
                    **{f"{key} median s": statistics.median(v) for key, v in samples.items()},
                }
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=61, help="interleaved rounds of the peak loops")
    parser.add_argument("--layer-repeats", type=positive_int, default=21)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--output", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    flags = native.cpu_flags()
    missing = sorted(NEEDS - flags)
    if missing:
        print(f"this CPU lacks {', '.join(missing)}: sad_peak.c needs AVX-512BW, AVX512-VNNI and FMA", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    lines = []

    def out(text=""):
        print(text, flush=True)
        lines.append(text)

    command = "python " + shlex.join(["benchmarks/sad_peak.py", *(argv if argv is not None else sys.argv[1:])])
    out(f"$ {command}")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    compiler = subprocess.run(
        [*(shlex.split(os.environ.get("CC", "")) or ["cc"]), "--version"], capture_output=True, text=True
    ).stdout.split("\n")[0]
    out(
        f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ}; load average before: {load} on "
        f"{os.cpu_count()} cores (shared machine)"
    )
    out(
        f"CPU: {cpu_name()}; {os.cpu_count()} logical cores; compiler: {compiler}; torch {torch.__version__}, "
        f"1 thread; python {platform.python_version()}"
    )
    peaks = run_peaks(args.rounds)
    hz = max(peaks["clock"]["instr_per_s"], peaks["clock_imul"]["ops_per_s"])
    out(f"\n1. Peak throughput, one core, best of {args.rounds} interleaved runs of 60 M instructions each")
    out(
        f"clock (dependent add chain; imul chain): {peaks['clock']['instr_per_s'] / 1e9:.2f} GHz; "
        f"{peaks['clock_imul']['ops_per_s'] / 1e9:.2f} GHz; per-cycle figures below use {hz / 1e9:.2f} GHz"
    )
    out(f"{'loop':<14} {'G instr/s':>10} {'instr/cycle':>11} {'ops/instr':>9} {'G ops/s':>9} {'ops/cycle':>9}")
    for name in KINDS[2:]:
        p = peaks[name]
        out(
            f"{name:<14} {p['instr_per_s'] / 1e9:>10.2f} {p['instr_per_s'] / hz:>11.2f} {p['ops_per_instr']:>9} "
            f"{p['ops_per_s'] / 1e9:>9.1f} {p['ops_per_s'] / hz:>9.1f}"
        )
    fma, sad = peaks["fma_zmm"]["ops_per_s"], peaks["sad_zmm"]["ops_per_s"]
    sad_add, sad_ifma = peaks["sad_add_zmm"]["ops_per_s"], peaks["sad_ifma_zmm"]["ops_per_s"]
    sad_acc = max(sad_add, sad_ifma)
    out("(ops: byte differences for sad/dbpsad, multiply-adds for fma/vnni; dbpsad's are over sliding windows)")
    out("lowest int8-adder / conv2d time ratio at equal efficiency = FMA MACs/s / SAD byte-diffs/s:")
    out(f"  SAD accumulated with VPADDQ (VPSADBW + VPADDQ zmm):                {fma / sad_add:.2f}")
    out(f"  SAD accumulated with VPMADD52LUQ (VPSADBW + VPMADD52LUQ zmm):      {fma / sad_ifma:.2f}")
    out(f"  SAD alone (VPSADBW zmm, no accumulation: unreachable in a reduction): {fma / sad:.2f}")

    rows = measure_layers(batches, args.layer_repeats)
    out(f"\n2. ResNet-50 layers, one thread, {args.layer_repeats} interleaved repetitions; best (median) ms")
    out(
        f"{'layer':<24} {'N':>2} {'conv2d ms':>15} {'GMAC/s':>7} {'%FMA':>5} {'int8 layer ms':>15} {'%SADacc':>7} "
        f"{'reduction ms':>15} {'G diff/s':>8} {'%SADacc':>7} {'%SAD':>5} {'layer/conv':>10}"
    )
    for row in rows:
        work = row["work"]
        conv, layer, red = (row[f"{k} best s"] for k in ("conv2d fp32", "int8 adder layer", "int8 reduction alone"))
        cm, lm, rm = (row[f"{k} median s"] for k in ("conv2d fp32", "int8 adder layer", "int8 reduction alone"))
        out(
            f"{row['layer']:<24} {row['batch']:>2} {conv * 1e3:>6.3f} ({cm * 1e3:>6.3f}) {work / conv / 1e9:>7.1f} "
            f"{100 * work / conv / fma:>4.0f}% {layer * 1e3:>6.3f} ({lm * 1e3:>6.3f}) "
            f"{100 * work / layer / sad_acc:>6.0f}% "
            f"{red * 1e3:>6.3f} ({rm * 1e3:>6.3f}) {work / red / 1e9:>8.1f} {100 * work / red / sad_acc:>6.0f}% "
            f"{100 * work / red / sad:>4.0f}% {layer / conv:>10.2f}"
        )
    out(f"(int8 kernel variant {native.load().isa}, flags {' '.join(native.isa_flags(native.load().isa))})")
    out("(%FMA: conv2d's MACs/s over the fma_zmm peak; %SADacc / %SAD: the int8 adder's byte differences/s over the")
    out(" best accumulated SAD peak (sad_add_zmm or sad_ifma_zmm) / the sad_zmm peak; layer/conv: best int8 adder")
    out(" layer time over best conv2d time)")
    out(f"# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
