/* Peak single-thread throughput of the instructions an int8 AdderNet and a float32 convolution are made of.
 *
 * Built and run by benchmarks/sad_peak.py (cc -O2 -mavx512f sad_peak.c -o sad_peak; ./sad_peak ROUNDS KIND...;
 * -mavx512f only lets the asm name zmm16-31: the instructions are in the asm, not chosen by the compiler).
 * Each KIND is a loop of 12 independent instructions per iteration, written in inline assembly so the
 * compiler can neither drop nor reorder them, with enough independent destinations (12) to cover
 * the latency of each (at most 5 cycles) at up to 2 per cycle; the time of the best of ROUNDS runs of
 * ITERS iterations is printed with the useful operations per instruction. The kinds run interleaved, one run
 * of each per round, so a change of clock (turbo) or of other load reaches all of them alike:
 *
 *   sad_zmm       VPSADBW zmm               64 byte differences (absolute, summed per 8-byte lane)
 *   sad_add_zmm   VPSADBW zmm + VPADDQ zmm  64 byte differences accumulated (the kernel's inner pair)
 *   sad_ifma_zmm  VPSADBW zmm + VPMADD52LUQ zmm (acc += sad * 1, AVX512-IFMA): the same pair with the
 *                 accumulation moved to the 52-bit multiply-add, which may run on another port
 *   sad_ymm       VPSADBW ymm               32 byte differences
 *   sad_add_ymm   VPSADBW ymm + VPADDQ ymm  32 byte differences accumulated
 *   dbpsad_zmm    VDBPSADBW zmm             128 byte differences, but over sliding 4-byte windows
 *                                           (motion estimation), not a general |a - b| sum
 *   fma_zmm       VFMADD231PS zmm           16 float32 multiply-adds
 *   fma_ymm       VFMADD231PS ymm           8 float32 multiply-adds
 *   vnni_zmm      VPDPBUSD zmm              64 int8 multiply-adds (what PyTorch's int8 convolution uses)
 *   clock         a chain of dependent 1-cycle scalar adds (add reg, reg): the core's cycles per second
 *   clock_imul    a chain of dependent 3-cycle imuls ("ops" = 3 cycles each): the same, checked
 *
 * Prints lines "KIND ops_per_instruction instructions_per_iteration iterations best_seconds".
 * The caller checks the CPU has the instructions (AVX-512BW, AVX-512F, AVX512-VNNI) before asking for them.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ITERS 5000000L /* 60 M instructions per run: 15-60 ms at 1-4 per ns */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void loop_sad_zmm(long n) {
    __asm__ volatile(
        "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
        "vpternlogd $0xff, %%zmm1, %%zmm1, %%zmm1\n\t"
        "1:\n\t"
        "vpsadbw %%zmm1, %%zmm0, %%zmm4\n\tvpsadbw %%zmm1, %%zmm0, %%zmm5\n\t"
        "vpsadbw %%zmm1, %%zmm0, %%zmm6\n\tvpsadbw %%zmm1, %%zmm0, %%zmm7\n\t"
        "vpsadbw %%zmm1, %%zmm0, %%zmm8\n\tvpsadbw %%zmm1, %%zmm0, %%zmm9\n\t"
        "vpsadbw %%zmm1, %%zmm0, %%zmm10\n\tvpsadbw %%zmm1, %%zmm0, %%zmm11\n\t"
        "vpsadbw %%zmm1, %%zmm0, %%zmm12\n\tvpsadbw %%zmm1, %%zmm0, %%zmm13\n\t"
        "vpsadbw %%zmm1, %%zmm0, %%zmm14\n\tvpsadbw %%zmm1, %%zmm0, %%zmm15\n\t"
        "dec %0\n\tjnz 1b\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
          "xmm14", "xmm15", "cc");
}

#define PAIRS(W)                                                                                          \
    "vpsadbw %%" W "1, %%" W "0, %%" W "16\n\tvpaddq %%" W "16, %%" W "4, %%" W "4\n\t"                     \
    "vpsadbw %%" W "1, %%" W "0, %%" W "17\n\tvpaddq %%" W "17, %%" W "5, %%" W "5\n\t"                     \
    "vpsadbw %%" W "1, %%" W "0, %%" W "18\n\tvpaddq %%" W "18, %%" W "6, %%" W "6\n\t"                     \
    "vpsadbw %%" W "1, %%" W "0, %%" W "19\n\tvpaddq %%" W "19, %%" W "7, %%" W "7\n\t"                     \
    "vpsadbw %%" W "1, %%" W "0, %%" W "20\n\tvpaddq %%" W "20, %%" W "8, %%" W "8\n\t"                     \
    "vpsadbw %%" W "1, %%" W "0, %%" W "21\n\tvpaddq %%" W "21, %%" W "9, %%" W "9\n\t"                     \
    "vpsadbw %%" W "1, %%" W "0, %%" W "22\n\tvpaddq %%" W "22, %%" W "10, %%" W "10\n\t"                   \
    "vpsadbw %%" W "1, %%" W "0, %%" W "23\n\tvpaddq %%" W "23, %%" W "11, %%" W "11\n\t"                   \
    "vpsadbw %%" W "1, %%" W "0, %%" W "24\n\tvpaddq %%" W "24, %%" W "12, %%" W "12\n\t"                   \
    "vpsadbw %%" W "1, %%" W "0, %%" W "25\n\tvpaddq %%" W "25, %%" W "13, %%" W "13\n\t"                   \
    "vpsadbw %%" W "1, %%" W "0, %%" W "26\n\tvpaddq %%" W "26, %%" W "14, %%" W "14\n\t"                   \
    "vpsadbw %%" W "1, %%" W "0, %%" W "27\n\tvpaddq %%" W "27, %%" W "15, %%" W "15\n\t"

#define CLOBBERS                                                                                              \
    "xmm0", "xmm1", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", \
        "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25",      \
        "xmm26", "xmm27", "cc"

static void loop_sad_add_zmm(long n) {
    __asm__ volatile("vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpternlogd $0xff, %%zmm1, %%zmm1, %%zmm1\n\t"
                     "1:\n\t" PAIRS("zmm") "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n)
                     :
                     : CLOBBERS);
}

/* the same pairs with the accumulation in VPMADD52LUQ (acc += sad * 1, AVX512-IFMA): a port the SAD does not use? */
#define IFMA_PAIRS                                                                                        \
    "vpsadbw %%zmm1, %%zmm0, %%zmm16\n\tvpmadd52luq %%zmm2, %%zmm16, %%zmm4\n\t"                             \
    "vpsadbw %%zmm1, %%zmm0, %%zmm17\n\tvpmadd52luq %%zmm2, %%zmm17, %%zmm5\n\t"                             \
    "vpsadbw %%zmm1, %%zmm0, %%zmm18\n\tvpmadd52luq %%zmm2, %%zmm18, %%zmm6\n\t"                             \
    "vpsadbw %%zmm1, %%zmm0, %%zmm19\n\tvpmadd52luq %%zmm2, %%zmm19, %%zmm7\n\t"                             \
    "vpsadbw %%zmm1, %%zmm0, %%zmm20\n\tvpmadd52luq %%zmm2, %%zmm20, %%zmm8\n\t"                             \
    "vpsadbw %%zmm1, %%zmm0, %%zmm21\n\tvpmadd52luq %%zmm2, %%zmm21, %%zmm9\n\t"                             \
    "vpsadbw %%zmm1, %%zmm0, %%zmm22\n\tvpmadd52luq %%zmm2, %%zmm22, %%zmm10\n\t"                            \
    "vpsadbw %%zmm1, %%zmm0, %%zmm23\n\tvpmadd52luq %%zmm2, %%zmm23, %%zmm11\n\t"                            \
    "vpsadbw %%zmm1, %%zmm0, %%zmm24\n\tvpmadd52luq %%zmm2, %%zmm24, %%zmm12\n\t"                            \
    "vpsadbw %%zmm1, %%zmm0, %%zmm25\n\tvpmadd52luq %%zmm2, %%zmm25, %%zmm13\n\t"                            \
    "vpsadbw %%zmm1, %%zmm0, %%zmm26\n\tvpmadd52luq %%zmm2, %%zmm26, %%zmm14\n\t"                            \
    "vpsadbw %%zmm1, %%zmm0, %%zmm27\n\tvpmadd52luq %%zmm2, %%zmm27, %%zmm15\n\t"

static void loop_sad_ifma_zmm(long n) {
    __asm__ volatile("vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpternlogd $0xff, %%zmm1, %%zmm1, %%zmm1\n\t"
                     "vpxord %%zmm2, %%zmm2, %%zmm2\n\t"
                     "1:\n\t" IFMA_PAIRS "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n)
                     :
                     : CLOBBERS, "xmm2");
}

static void loop_sad_add_ymm(long n) {
    __asm__ volatile("vpxor %%ymm0, %%ymm0, %%ymm0\n\tvpcmpeqb %%ymm1, %%ymm1, %%ymm1\n\t"
                     "1:\n\t" PAIRS("ymm") "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n)
                     :
                     : CLOBBERS);
}

#define TWELVE(INSN, W)                                                                                    \
    INSN " %%" W "1, %%" W "0, %%" W "4\n\t" INSN " %%" W "1, %%" W "0, %%" W "5\n\t" INSN " %%" W "1, %%" W \
         "0, %%" W "6\n\t" INSN " %%" W "1, %%" W "0, %%" W "7\n\t" INSN " %%" W "1, %%" W "0, %%" W          \
         "8\n\t" INSN " %%" W "1, %%" W "0, %%" W "9\n\t" INSN " %%" W "1, %%" W "0, %%" W "10\n\t" INSN      \
         " %%" W "1, %%" W "0, %%" W "11\n\t" INSN " %%" W "1, %%" W "0, %%" W "12\n\t" INSN " %%" W "1, %%" W \
         "0, %%" W "13\n\t" INSN " %%" W "1, %%" W "0, %%" W "14\n\t" INSN " %%" W "1, %%" W "0, %%" W "15\n\t"

static void loop_sad_ymm(long n) {
    __asm__ volatile("vpxor %%ymm0, %%ymm0, %%ymm0\n\tvpcmpeqb %%ymm1, %%ymm1, %%ymm1\n\t"
                     "1:\n\t" TWELVE("vpsadbw", "ymm") "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n)
                     :
                     : CLOBBERS);
}

static void loop_dbpsad_zmm(long n) {
    __asm__ volatile("vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpternlogd $0xff, %%zmm1, %%zmm1, %%zmm1\n\t"
                     "1:\n\t" TWELVE("vdbpsadbw $0,", "zmm") "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n)
                     :
                     : CLOBBERS);
}

/* acc_i += a * b: each destination is also a source, a chain per register (latency 4) */
#define ACC12(INSN, W)                                                                                    \
    INSN " %%" W "1, %%" W "0, %%" W "4\n\t" INSN " %%" W "1, %%" W "0, %%" W "5\n\t" INSN " %%" W "1, %%" W \
         "0, %%" W "6\n\t" INSN " %%" W "1, %%" W "0, %%" W "7\n\t" INSN " %%" W "1, %%" W "0, %%" W          \
         "8\n\t" INSN " %%" W "1, %%" W "0, %%" W "9\n\t" INSN " %%" W "1, %%" W "0, %%" W "10\n\t" INSN      \
         " %%" W "1, %%" W "0, %%" W "11\n\t" INSN " %%" W "1, %%" W "0, %%" W "12\n\t" INSN " %%" W "1, %%" W \
         "0, %%" W "13\n\t" INSN " %%" W "1, %%" W "0, %%" W "14\n\t" INSN " %%" W "1, %%" W "0, %%" W "15\n\t"
#define ZERO_ACC(W)                                                                                           \
    "vxorps %%" W "4, %%" W "4, %%" W "4\n\tvxorps %%" W "5, %%" W "5, %%" W "5\n\tvxorps %%" W "6, %%" W       \
    "6, %%" W "6\n\tvxorps %%" W "7, %%" W "7, %%" W "7\n\tvxorps %%" W "8, %%" W "8, %%" W "8\n\tvxorps %%" W \
    "9, %%" W "9, %%" W "9\n\tvxorps %%" W "10, %%" W "10, %%" W "10\n\tvxorps %%" W "11, %%" W "11, %%" W     \
    "11\n\tvxorps %%" W "12, %%" W "12, %%" W "12\n\tvxorps %%" W "13, %%" W "13, %%" W "13\n\tvxorps %%" W    \
    "14, %%" W "14, %%" W "14\n\tvxorps %%" W "15, %%" W "15, %%" W "15\n\t"

/* a = 0.5, b = 0.0 in every lane: the accumulators stay 0.0 (no denormals, no overflow) */
static void loop_fma_zmm(long n) {
    const float half = 0.5f;
    __asm__ volatile("vbroadcastss %1, %%zmm0\n\tvxorps %%zmm1, %%zmm1, %%zmm1\n\t" ZERO_ACC("zmm")
                     "1:\n\t" ACC12("vfmadd231ps", "zmm") "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n)
                     : "m"(half)
                     : CLOBBERS);
}

static void loop_fma_ymm(long n) {
    const float half = 0.5f;
    __asm__ volatile("vbroadcastss %1, %%ymm0\n\tvxorps %%ymm1, %%ymm1, %%ymm1\n\t" ZERO_ACC("ymm")
                     "1:\n\t" ACC12("vfmadd231ps", "ymm") "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n)
                     : "m"(half)
                     : CLOBBERS);
}

static void loop_vnni_zmm(long n) {
    __asm__ volatile("vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpxord %%zmm1, %%zmm1, %%zmm1\n\t" ZERO_ACC("zmm")
                     "1:\n\t" ACC12("vpdpbusd", "zmm") "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n)
                     :
                     : CLOBBERS);
}

static void loop_clock(long n) {
    /* add reg, reg (not add reg, imm: recent Intel cores fold chains of immediate adds at rename) */
    uint64_t x = 1, y = 3;
    __asm__ volatile("1:\n\t"
                     "add %2, %1\n\tadd %2, %1\n\tadd %2, %1\n\tadd %2, %1\n\tadd %2, %1\n\tadd %2, %1\n\t"
                     "add %2, %1\n\tadd %2, %1\n\tadd %2, %1\n\tadd %2, %1\n\tadd %2, %1\n\tadd %2, %1\n\t"
                     "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n), "+r"(x)
                     : "r"(y)
                     : "cc");
}

static void loop_clock_imul(long n) {
    /* imul reg, reg: 3 cycles on every Intel core since Nehalem */
    uint64_t x = 1, y = 3;
    __asm__ volatile("1:\n\t"
                     "imul %2, %1\n\timul %2, %1\n\timul %2, %1\n\timul %2, %1\n\t"
                     "imul %2, %1\n\timul %2, %1\n\timul %2, %1\n\timul %2, %1\n\t"
                     "imul %2, %1\n\timul %2, %1\n\timul %2, %1\n\timul %2, %1\n\t"
                     "dec %0\n\tjnz 1b\n\t"
                     : "+r"(n), "+r"(x)
                     : "r"(y)
                     : "cc");
}

struct kind {
    const char *name;
    void (*loop)(long);
    int ops; /* useful operations per instruction */
    int per_iter;
};

static const struct kind KINDS[] = {
    {"sad_zmm", loop_sad_zmm, 64, 12},     {"sad_add_zmm", loop_sad_add_zmm, 64, 12},
    {"sad_ifma_zmm", loop_sad_ifma_zmm, 64, 12}, {"sad_ymm", loop_sad_ymm, 32, 12},     {"sad_add_ymm", loop_sad_add_ymm, 32, 12},
    {"dbpsad_zmm", loop_dbpsad_zmm, 128, 12}, {"fma_zmm", loop_fma_zmm, 16, 12},
    {"fma_ymm", loop_fma_ymm, 8, 12},      {"vnni_zmm", loop_vnni_zmm, 64, 12},
    {"clock", loop_clock, 1, 12},          {"clock_imul", loop_clock_imul, 3, 12},
};

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ROUNDS KIND...\n", argv[0]);
        return 2;
    }
    const int rounds = atoi(argv[1]), count = argc - 2;
    const struct kind *chosen[64];
    double best[64];
    if (count > 64) return 2;
    for (int a = 0; a < count; a++) {
        chosen[a] = NULL;
        for (size_t i = 0; i < sizeof(KINDS) / sizeof(KINDS[0]); i++)
            if (strcmp(KINDS[i].name, argv[a + 2]) == 0) chosen[a] = &KINDS[i];
        if (chosen[a] == NULL) {
            fprintf(stderr, "unknown kind %s\n", argv[a + 2]);
            return 2;
        }
        chosen[a]->loop(ITERS); /* warm up: the core's AVX-512 frequency licence, the page of code */
        best[a] = 1e30;
    }
    /* rounds: every kind once per round, in order, so a change of clock or load reaches all of them */
    for (int r = 0; r < rounds; r++)
        for (int a = 0; a < count; a++) {
            const double t0 = now();
            chosen[a]->loop(ITERS);
            const double t = now() - t0;
            if (t < best[a]) best[a] = t;
        }
    for (int a = 0; a < count; a++)
        printf("%s %d %d %ld %.6f\n", chosen[a]->name, chosen[a]->ops, chosen[a]->per_iter, ITERS, best[a]);
    return 0;
}
