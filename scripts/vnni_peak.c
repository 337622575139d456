// The peak rate of 512-bit `vpdpbusd` on one core: 12 independent accumulator chains, so
// neither latency nor memory limits it. It bounds what any AVX-512 VNNI kernel can reach when
// extra rows make a forward compute-bound (BENCHMARKS.md, 2026-12-07).
//
//     gcc -O2 -march=native scripts/vnni_peak.c -o /tmp/vnni_peak && /tmp/vnni_peak
//
// The 12 statements are written out so that every accumulator stays in a register. Needs a CPU
// with AVX-512 VNNI.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  __m512i a0=_mm512_set1_epi32(0);
  __m512i a1=_mm512_set1_epi32(1);
  __m512i a2=_mm512_set1_epi32(2);
  __m512i a3=_mm512_set1_epi32(3);
  __m512i a4=_mm512_set1_epi32(4);
  __m512i a5=_mm512_set1_epi32(5);
  __m512i a6=_mm512_set1_epi32(6);
  __m512i a7=_mm512_set1_epi32(7);
  __m512i a8=_mm512_set1_epi32(8);
  __m512i a9=_mm512_set1_epi32(9);
  __m512i a10=_mm512_set1_epi32(10);
  __m512i a11=_mm512_set1_epi32(11);
  __m512i x=_mm512_set1_epi8(3), y=_mm512_set1_epi8(5);
  long n=100000000;
  for(int rep=0;rep<3;rep++){
  double t=now();
  for(long i=0;i<n;i++){
    __asm__ volatile("" : "+v"(x), "+v"(y));
    a0=_mm512_dpbusd_epi32(a0,x,y);
    a1=_mm512_dpbusd_epi32(a1,x,y);
    a2=_mm512_dpbusd_epi32(a2,x,y);
    a3=_mm512_dpbusd_epi32(a3,x,y);
    a4=_mm512_dpbusd_epi32(a4,x,y);
    a5=_mm512_dpbusd_epi32(a5,x,y);
    a6=_mm512_dpbusd_epi32(a6,x,y);
    a7=_mm512_dpbusd_epi32(a7,x,y);
    a8=_mm512_dpbusd_epi32(a8,x,y);
    a9=_mm512_dpbusd_epi32(a9,x,y);
    a10=_mm512_dpbusd_epi32(a10,x,y);
    a11=_mm512_dpbusd_epi32(a11,x,y);
  }
  double dt=now()-t;
  printf("zmm vpdpbusd: %.3f G/s (%.3f ns each) chk %d\n", n*12/dt/1e9, dt/(n*12)*1e9, _mm512_reduce_add_epi32(a0)+_mm512_reduce_add_epi32(a1)+_mm512_reduce_add_epi32(a2)+_mm512_reduce_add_epi32(a3)+_mm512_reduce_add_epi32(a4)+_mm512_reduce_add_epi32(a5)+_mm512_reduce_add_epi32(a6)+_mm512_reduce_add_epi32(a7)+_mm512_reduce_add_epi32(a8)+_mm512_reduce_add_epi32(a9)+_mm512_reduce_add_epi32(a10)+_mm512_reduce_add_epi32(a11));
  }
  return 0;
}
