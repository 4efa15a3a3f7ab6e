/* The CPU's peak float32 multiply-add rate: each OpenMP thread runs 12 independent chains of
 * vector multiply-adds (enough to cover the multiply-add latency on both of a core's pipes), in
 * registers, never touching memory. Prints GFLOP/s (2 flops per multiply-add lane), the best of 7.
 * bench/harness.py compiles it with -O3 -march=native -ffp-contract=fast -fopenmp, so the vector
 * width is the widest the compiler targets here. */
#include <omp.h>
#include <stdio.h>

/* A vector of LANES floats is one register: 12 chains and the two operands fit in 16 registers. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#define CHAINS 12

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

int main(void) {
  const long iters = 20000000;
  double best = 0;
  float keep = 0;
  for (int rep = 0; rep < 7; rep++) {
    int threads = 1;
    double start = omp_get_wtime();
#pragma omp parallel reduction(+ : keep)
    {
#pragma omp single
      threads = omp_get_num_threads();
      vec acc[CHAINS], mul, add;
      for (int l = 0; l < LANES; l++) {
        mul[l] = 0.999999f;
        add[l] = 1e-7f;
      }
      for (int c = 0; c < CHAINS; c++)
        for (int l = 0; l < LANES; l++) acc[c][l] = (float)(c + l);
      for (long it = 0; it < iters; it++)
        for (int c = 0; c < CHAINS; c++) acc[c] = acc[c] * mul + add;
      for (int c = 0; c < CHAINS; c++)
        for (int l = 0; l < LANES; l++) keep += acc[c][l];
    }
    double seconds = omp_get_wtime() - start;
    double flops = 2.0 * threads * iters * CHAINS * LANES;
    if (flops / seconds > best) best = flops / seconds;
  }
  /* keep is printed so that the chains are not optimised away. */
  printf("%.1f %g\n", best / 1e9, keep);
  return 0;
}
