// The peak rate of 512-bit `vpdpbusd` on one core: 12 independent accumulator chains, so
// neither latency nor memory limits it. It bounds what any AVX-512 VNNI kernel can reach when
// extra rows make a forward compute-bound (BENCHMARKS.md, 2026-12-07).
//
//     gcc -O2 -march=native scripts/vnni_peak.c -o /tmp/vnni_peak && /tmp/vnni_peak
//
// The 12 accumulators are separate variables (through EACH) so that each stays in a register;
// an array of them was kept in memory at -O2. Needs a CPU with AVX-512 VNNI.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define EACH(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11)
#define DECLARE(k) __m512i a##k = _mm512_set1_epi32(k);
#define STEP(k) a##k = _mm512_dpbusd_epi32(a##k, x, y);
#define SUM(k) +_mm512_reduce_add_epi32(a##k)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  EACH(DECLARE)
  __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(5);
  long n = 100000000;
  for (int rep = 0; rep < 3; rep++) {
    double t = now();
    for (long i = 0; i < n; i++) {
      // Opaque operands, so that the compiler cannot fold the loop.
      __asm__ volatile("" : "+v"(x), "+v"(y));
      EACH(STEP)
    }
    double dt = now() - t;
    printf("zmm vpdpbusd: %.3f G/s (%.3f ns each) chk %d\n", n * 12 / dt / 1e9,
           dt / (n * 12) * 1e9, 0 EACH(SUM));
  }
  return 0;
}
