// geode CPU decode kernels, AVX2 + FMA + F16C, float32 activations:
//   - y = x W^T for few rows of x (decode batches), weights in the Hugging Face (out, in)
//     row-major layout, threads over output rows; a register-blocked GEMM from 6 rows on
//     (slabs of GEMM_SLAB rows per pass over the weights);
//   - Gemma's RMSNorm and QK-norm + RoPE;
//   - geode_run: the whole decoder for flattened new tokens of several cache rows in one call
//     (prefill chunks and decode tokens mixed; a decode step is one token per row).
//
// Weight formats (one call may take several weights that share the same x, e.g. q/k/v):
//   f32   W (N, K) float
//   bf16  W (N, K) bfloat16 (uint16 bits), widened to float by a 16-bit shift
//   i8    W (N, K) int8 with one float scale per output row: w = q * s[n]
//   i4    W (N, K/2) bytes, groups of G (multiple of 32) along K with float16 scale and min:
//         w = q * s + m, q in 0..15. In each block of 32 values, byte j holds value j in its low
//         nibble and value j + 16 in its high nibble.
// Decode is memory-bound: every weight byte is read once per call whatever M is, with x rows
// (M x K floats) kept in L1/L2.
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAXW 8

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

static inline __m256 load_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128((const __m128i*)p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 load_i8(const int8_t* p) {
  __m128i b = _mm_loadl_epi64((const __m128i*)p);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

static inline float bf16_to_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------- float / bf16 / int8 rows

// Bytes a bfloat16 / int8 weight row is prefetched ahead (into the next rows of the chunk):
// the hardware prefetcher alone left bfloat16 rows at ~15 GB/s on 2 threads, ~18-22 with this
// (float32 rows, at the read bandwidth already, measured no better: none there).
#define ROW_AHEAD 4096

// One output row n against MB x rows (MB <= 4, a compile-time constant at each call site so
// the accumulators stay in registers); K % 16 handled by a scalar tail.
#define DEFINE_ROW_KERNEL(NAME, WT, LOADV, LOADS, AHEAD)                                        \
  static inline __attribute__((always_inline)) void NAME##_mb(                                 \
      int K, const WT* w, const float* x, int ldx, const int MB, float* out) {                 \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;                                                  \
    int k = 0;                                                                                  \
    for (; k + 16 <= K; k += 16) {                                                              \
      if (AHEAD) _mm_prefetch((const char*)(w + k) + AHEAD, _MM_HINT_T0);                       \
      __m256 w0 = LOADV(w + k), w1 = LOADV(w + k + 8);                                          \
      a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);                                     \
      b0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), b0);                                 \
      if (MB > 1) {                                                                             \
        a1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + ldx + k), a1);                             \
        b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + ldx + k + 8), b1);                         \
      }                                                                                         \
      if (MB > 2) {                                                                             \
        a2 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + 2 * ldx + k), a2);                         \
        b2 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 2 * ldx + k + 8), b2);                     \
      }                                                                                         \
      if (MB > 3) {                                                                             \
        a3 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + 3 * ldx + k), a3);                         \
        b3 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 3 * ldx + k + 8), b3);                     \
      }                                                                                         \
    }                                                                                           \
    float s[4] = {hsum(_mm256_add_ps(a0, b0)), hsum(_mm256_add_ps(a1, b1)),                     \
                  hsum(_mm256_add_ps(a2, b2)), hsum(_mm256_add_ps(a3, b3))};                    \
    for (; k < K; k++) {                                                                        \
      float wk = LOADS(w[k]);                                                                   \
      for (int m = 0; m < MB; m++) s[m] += wk * x[m * ldx + k];                                 \
    }                                                                                           \
    for (int m = 0; m < MB; m++) out[m] = s[m];                                                 \
  }                                                                                             \
  static void NAME(int K, const WT* w, const float* x, int ldx, int MB, float* out) {          \
    switch (MB) {                                                                               \
      case 1: NAME##_mb(K, w, x, ldx, 1, out); break;                                           \
      case 2: NAME##_mb(K, w, x, ldx, 2, out); break;                                           \
      case 3: NAME##_mb(K, w, x, ldx, 3, out); break;                                           \
      default: NAME##_mb(K, w, x, ldx, 4, out); break;                                          \
    }                                                                                           \
  }

// Two output rows against four x rows: each x load feeds two FMAs (batched decode is
// compute-bound; this halves the loads per FMA of the one-row kernel).
#define DEFINE_ROW2_KERNEL(NAME, WT, LOADV, LOADS)                                              \
  static void NAME(int K, const WT* w0, const WT* w1, const float* x, int ldx, float* out0,    \
                   float* out1) {                                                               \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
    __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;                                                  \
    int k = 0;                                                                                  \
    for (; k + 8 <= K; k += 8) {                                                                \
      __m256 u = LOADV(w0 + k), v = LOADV(w1 + k), t;                                           \
      t = _mm256_loadu_ps(x + k);                                                               \
      a0 = _mm256_fmadd_ps(u, t, a0);                                                           \
      c0 = _mm256_fmadd_ps(v, t, c0);                                                           \
      t = _mm256_loadu_ps(x + ldx + k);                                                         \
      a1 = _mm256_fmadd_ps(u, t, a1);                                                           \
      c1 = _mm256_fmadd_ps(v, t, c1);                                                           \
      t = _mm256_loadu_ps(x + 2 * ldx + k);                                                     \
      a2 = _mm256_fmadd_ps(u, t, a2);                                                           \
      c2 = _mm256_fmadd_ps(v, t, c2);                                                           \
      t = _mm256_loadu_ps(x + 3 * ldx + k);                                                     \
      a3 = _mm256_fmadd_ps(u, t, a3);                                                           \
      c3 = _mm256_fmadd_ps(v, t, c3);                                                           \
    }                                                                                           \
    out0[0] = hsum(a0), out0[1] = hsum(a1), out0[2] = hsum(a2), out0[3] = hsum(a3);             \
    out1[0] = hsum(c0), out1[1] = hsum(c1), out1[2] = hsum(c2), out1[3] = hsum(c3);             \
    for (; k < K; k++) {                                                                        \
      float p = LOADS(w0[k]), q = LOADS(w1[k]);                                                 \
      for (int m = 0; m < 4; m++) {                                                             \
        out0[m] += p * x[m * ldx + k];                                                          \
        out1[m] += q * x[m * ldx + k];                                                          \
      }                                                                                         \
    }                                                                                           \
  }

#define ID(v) (v)
#define F32V(p) _mm256_loadu_ps(p)
DEFINE_ROW2_KERNEL(row2_f32, float, F32V, ID)
DEFINE_ROW2_KERNEL(row2_bf16, uint16_t, load_bf16, bf16_to_f32)
DEFINE_ROW2_KERNEL(row2_i8, int8_t, load_i8, (float))
DEFINE_ROW_KERNEL(row_f32, float, F32V, ID, 0)
DEFINE_ROW_KERNEL(row_bf16, uint16_t, load_bf16, bf16_to_f32, ROW_AHEAD)
DEFINE_ROW_KERNEL(row_i8, int8_t, load_i8, (float), ROW_AHEAD)

// ---------------------------------------------------------------- int4 group-wise rows
// MB is a compile-time constant at each call site (always_inline), so the per-row partial sums
// stay in registers. Each block of 32 values is two 8-byte loads zero-extended to 32-bit lanes:
// the low nibbles are values j, the high nibbles values j + 16. One x row (batch-1 decode) keeps
// four independent partial sums so that consecutive FMAs do not wait for each other; two rows
// keep two each.
static inline __attribute__((always_inline)) void row_i4_mb(
    int K, int G, const uint8_t* w, const uint16_t* sc, const uint16_t* mn, const float* x,
    int ldx, const float* xs, int ldxs, const int MB, float* out) {
  const __m256i low = _mm256_set1_epi32(0x0F);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  float bias[4] = {0, 0, 0, 0};
  int ngroups = K / G;
  for (int g = 0; g < ngroups; g++) {
    __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;  // MB > 2: one per row
    __m256 e0 = p0, e1 = p0;                                     // MB <= 2: extra partials
    for (int b = 0; b < G; b += 32) {
      int k = g * G + b;
      __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w + k / 2)));
      __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w + k / 2 + 8)));
      __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, low));  // values k .. k+7
      __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, low));  // k+8 .. k+15
      __m256 q2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));   // k+16 .. k+23
      __m256 q3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));   // k+24 .. k+31
      if (MB == 1) {
        p0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x + k), p0);
        e0 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + k + 8), e0);
        p1 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(x + k + 16), p1);
        e1 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(x + k + 24), e1);
      } else if (MB == 2) {
        p0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x + k), p0);
        e0 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + k + 8), e0);
        p0 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(x + k + 16), p0);
        e0 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(x + k + 24), e0);
        p1 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x + ldx + k), p1);
        e1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + ldx + k + 8), e1);
        p1 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(x + ldx + k + 16), p1);
        e1 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(x + ldx + k + 24), e1);
      } else {
#define I4_ROW(P, M)                                                  \
  {                                                                   \
    const float* xm = x + (M) * ldx + k;                              \
    P = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xm), P);                  \
    P = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xm + 8), P);              \
    P = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xm + 16), P);             \
    P = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xm + 24), P);             \
  }
        I4_ROW(p0, 0);
        I4_ROW(p1, 1);
        I4_ROW(p2, 2);
        if (MB > 3) I4_ROW(p3, 3);
#undef I4_ROW
      }
    }
    __m256 sv = _mm256_set1_ps(_cvtsh_ss(sc[g]));
    float m0 = _cvtsh_ss(mn[g]);
    if (MB == 1) {  // four accumulators: no reduction on the group's critical path
      acc0 = _mm256_fmadd_ps(sv, p0, acc0);
      acc1 = _mm256_fmadd_ps(sv, e0, acc1);
      acc2 = _mm256_fmadd_ps(sv, p1, acc2);
      acc3 = _mm256_fmadd_ps(sv, e1, acc3);
      bias[0] += m0 * xs[g];
      continue;
    }
    if (MB == 2) {
      p0 = _mm256_add_ps(p0, e0);
      p1 = _mm256_add_ps(p1, e1);
    }
    acc0 = _mm256_fmadd_ps(sv, p0, acc0);
    bias[0] += m0 * xs[g];
    if (MB > 1) {
      acc1 = _mm256_fmadd_ps(sv, p1, acc1);
      bias[1] += m0 * xs[ldxs + g];
    }
    if (MB > 2) {
      acc2 = _mm256_fmadd_ps(sv, p2, acc2);
      bias[2] += m0 * xs[2 * ldxs + g];
    }
    if (MB > 3) {
      acc3 = _mm256_fmadd_ps(sv, p3, acc3);
      bias[3] += m0 * xs[3 * ldxs + g];
    }
  }
  if (MB == 1) {
    out[0] = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))) + bias[0];
    return;
  }
  out[0] = hsum(acc0) + bias[0];
  if (MB > 1) out[1] = hsum(acc1) + bias[1];
  if (MB > 2) out[2] = hsum(acc2) + bias[2];
  if (MB > 3) out[3] = hsum(acc3) + bias[3];
}

// Two int4 rows against one x row (batch-1 decode): the x loads and the loop overhead are
// shared, and the eight partial sums keep the FMA units busy.
static void row2_i4(int K, int G, const uint8_t* wa, const uint8_t* wb, const uint16_t* sa,
                    const uint16_t* sb, const uint16_t* ma, const uint16_t* mb, const float* x,
                    const float* xs, float* out) {
  const __m256i low = _mm256_set1_epi32(0x0F);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
  float bias_a = 0, bias_b = 0;
  const int ngroups = K / G;
  for (int g = 0; g < ngroups; g++) {
    __m256 pa0 = _mm256_setzero_ps(), pa1 = pa0, pb0 = pa0, pb1 = pa0;
    for (int b = 0; b < G; b += 32) {
      const int k = g * G + b;
      __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      __m256 x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
#define I4_PAIR(W, P0, P1)                                                                   \
  {                                                                                          \
    __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(W + k / 2)));          \
    __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(W + k / 2 + 8)));      \
    P0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, low)), x0, P0);            \
    P1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, low)), x1, P1);            \
    P0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), x2, P0);             \
    P1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), x3, P1);             \
  }
      I4_PAIR(wa, pa0, pa1)
      I4_PAIR(wb, pb0, pb1)
#undef I4_PAIR
    }
    __m256 sva = _mm256_set1_ps(_cvtsh_ss(sa[g])), svb = _mm256_set1_ps(_cvtsh_ss(sb[g]));
    a0 = _mm256_fmadd_ps(sva, pa0, a0), a1 = _mm256_fmadd_ps(sva, pa1, a1);
    b0 = _mm256_fmadd_ps(svb, pb0, b0), b1 = _mm256_fmadd_ps(svb, pb1, b1);
    bias_a += _cvtsh_ss(ma[g]) * xs[g];
    bias_b += _cvtsh_ss(mb[g]) * xs[g];
  }
  out[0] = hsum(_mm256_add_ps(a0, a1)) + bias_a;
  out[1] = hsum(_mm256_add_ps(b0, b1)) + bias_b;
}

static void row_i4(int K, int G, const uint8_t* w, const uint16_t* sc, const uint16_t* mn,
                   const float* x, int ldx, const float* xs, int ldxs, int MB, float* out) {
  switch (MB) {
    case 1: row_i4_mb(K, G, w, sc, mn, x, ldx, xs, ldxs, 1, out); break;
    case 2: row_i4_mb(K, G, w, sc, mn, x, ldx, xs, ldxs, 2, out); break;
    case 3: row_i4_mb(K, G, w, sc, mn, x, ldx, xs, ldxs, 3, out); break;
    default: row_i4_mb(K, G, w, sc, mn, x, ldx, xs, ldxs, 4, out); break;
  }
}

// ---------------------------------------------------------------- thread pool
// A pool that never waits for a thread that is not running. The caller publishes a job of
// `nchunks` chunks and claims chunks itself; helpers that are awake claim the others. The caller
// waits only for chunks a helper has already claimed. An OpenMP barrier instead waits for every
// thread of the team, so on a shared machine a helper descheduled by the OS stalls each parallel
// region for a time slice (measured here: batch-1 decode 20x slower with one busy neighbour).
// Claims are a compare-and-swap on (generation << 32 | next chunk): a helper holding stale job
// parameters can never claim a chunk of a newer job.
typedef void (*job_fn)(const void* args, long begin, long end);

static struct {
  _Atomic uint64_t word;  // generation << 32 | next unclaimed chunk
  _Atomic long done;      // chunks finished in the current job
  _Atomic int sleepers;
  job_fn fn;
  const void* args;
  long items, chunk, nchunks;
  int nhelpers;
  pthread_mutex_t mu;    // helpers sleep on cv under mu
  pthread_cond_t cv;
  pthread_mutex_t busy;  // one caller at a time; others run their job inline
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER,
          .busy = PTHREAD_MUTEX_INITIALIZER};

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static long pool_claim(uint32_t gen, long nchunks) {
  uint64_t w = atomic_load_explicit(&pool.word, memory_order_acquire);
  for (;;) {
    if ((uint32_t)(w >> 32) != gen) return -1;
    long i = (long)(w & 0xffffffffu);
    if (i >= nchunks) return -1;
    if (atomic_compare_exchange_weak(&pool.word, &w, w + 1)) return i;
  }
}

// Claim and run chunks of job `gen` until none is left; returns the longest chunk's seconds
// when `timed` (the caller), else 0.
static double pool_run_chunks(uint32_t gen, job_fn fn, const void* args, long items, long chunk,
                              long nchunks, int timed) {
  long i;
  double longest = 0;
  while ((i = pool_claim(gen, nchunks)) >= 0) {
    long b = i * chunk, e = b + chunk < items ? b + chunk : items;
    double t = timed ? now_s() : 0;
    fn(args, b, e);
    if (timed && now_s() - t > longest) longest = now_s() - t;
    atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
  }
  return longest;
}

static void* pool_helper(void* unused) {
  (void)unused;
  uint32_t seen = (uint32_t)(atomic_load(&pool.word) >> 32);
  for (;;) {
    uint64_t w = 0;
    for (int spin = 0; spin < 200000; spin++) {  // ~0.1-1 ms hot, then sleep
      w = atomic_load_explicit(&pool.word, memory_order_acquire);
      if ((uint32_t)(w >> 32) != seen) break;
      _mm_pause();
    }
    if ((uint32_t)(w >> 32) == seen) {
      pthread_mutex_lock(&pool.mu);
      atomic_fetch_add(&pool.sleepers, 1);
      while ((uint32_t)(atomic_load(&pool.word) >> 32) == seen)
        pthread_cond_wait(&pool.cv, &pool.mu);
      atomic_fetch_sub(&pool.sleepers, 1);
      pthread_mutex_unlock(&pool.mu);
      w = atomic_load_explicit(&pool.word, memory_order_acquire);
    }
    seen = (uint32_t)(w >> 32);
    // Parameters are stable while this generation has unclaimed chunks (see pool_run).
    job_fn fn = pool.fn;
    const void* args = pool.args;
    long items = pool.items, chunk = pool.chunk, nchunks = pool.nchunks;
    pool_run_chunks(seen, fn, args, items, chunk, nchunks, 0);
  }
  return 0;
}

static void pool_atfork_child(void) {  // threads do not survive fork
  pool.nhelpers = 0;
  pthread_mutex_init(&pool.mu, 0);
  pthread_cond_init(&pool.cv, 0);
  pthread_mutex_init(&pool.busy, 0);
  atomic_store(&pool.sleepers, 0);
}

// When the caller had to wait long for a helper's chunk (the helper was preempted: the machine
// is oversubscribed), jobs run on the caller alone for a while, then threads are tried again.
static double solo_until = 0, solo_len = 0.01;
static _Atomic int pool_solo_count;  // times the pool went solo (read by geode_decode_profile)

// Run fn over [0, items) in chunks with up to `nthreads` threads (the caller included).
static void pool_run(job_fn fn, const void* args, long items, long chunk, int nthreads) {
  long nchunks = (items + chunk - 1) / chunk;
  if (nthreads <= 1 || nchunks <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
    fn(args, 0, items);
    return;
  }
  if (solo_until > 0 && now_s() < solo_until) {
    pthread_mutex_unlock(&pool.busy);
    fn(args, 0, items);
    return;
  }
  if (nthreads - 1 > pool.nhelpers) {
    static int atfork = 0;
    if (!atfork) {
      pthread_atfork(0, 0, pool_atfork_child);
      atfork = 1;
    }
    while (pool.nhelpers < nthreads - 1 && pool.nhelpers < 63) {
      pthread_t t;
      if (pthread_create(&t, 0, pool_helper, 0) != 0) break;
      pthread_detach(t);
      pool.nhelpers++;
    }
  }
  // The previous job is fully claimed and done, so no helper can claim with old parameters.
  pool.fn = fn;
  pool.args = args;
  pool.items = items;
  pool.chunk = chunk;
  pool.nchunks = nchunks;
  atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
  uint32_t gen = (uint32_t)(atomic_load(&pool.word) >> 32) + 1;
  atomic_store_explicit(&pool.word, (uint64_t)gen << 32, memory_order_seq_cst);
  if (atomic_load(&pool.sleepers) > 0) {
    pthread_mutex_lock(&pool.mu);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
  }
  double longest = pool_run_chunks(gen, fn, args, items, chunk, nchunks, 1);
  if (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks) {
    double t0 = now_s();
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks) _mm_pause();
    double waited = now_s() - t0;
    // Chunks take ~10-100 us; waiting over 1 ms and much longer than any chunk the caller ran
    // means the helper was preempted (OS time slices are ms long).
    int preempted = waited > 1e-3 && waited > 4 * longest;
    // (Typically torch's OpenMP workers still spinning after a prefill forward share the
    // helper's core for a few ms: so solo starts short.)
    if (preempted) {  // solo for a while: 10 ms, doubling while it keeps happening (to 1 s)
      solo_until = t0 + waited + solo_len;
      solo_len = solo_len * 2 < 1.0 ? solo_len * 2 : 1.0;
      atomic_fetch_add(&pool_solo_count, 1);
    } else {
      solo_until = 0;
    }
  } else {
    solo_len = 0.01;  // the helpers kept up
  }
  pthread_mutex_unlock(&pool.busy);
}

// ---------------------------------------------------------------- drivers
// A linear: nw <= MAXW weights of one kind that share x (M, K); weight i writes columns
// [off_i, off_i + N[i]) of y (M, ldy), off_i = N[0] + ... + N[i-1] (e.g. q/k/v in one call).
// kind: 0 f32, 1 bf16, 2 i8 (aux[i] = float scales (N)), 3 i4 (aux[i] = f16 scales, aux2[i] =
// f16 mins, both (N, K/G); G = group). P[i]: weight i packed by geode_pack (f32 and bf16 only,
// or 0), which the register-blocked GEMM (6+ rows) reads instead of W[i].
typedef struct {
  int kind, K, G, nw;
  int N[MAXW];
  const void* W[MAXW];
  const void* aux[MAXW];
  const void* aux2[MAXW];
  const void* P[MAXW];
} geode_linear;

typedef struct {
  const geode_linear* L;
  int M, ngroups, ldy;
  const float* x;
  const float* xs;  // int4: per-group sums of x (M, K/G)
  long start[MAXW + 1];
  float* y;
} gemv_args;

// Few x rows (M < GEMM_MIN_ROWS): each weight row is read once and dotted with every x row.
static void gemv_rows(const void* p, long r0, long r1) {
  const gemv_args* a = (const gemv_args*)p;
  const geode_linear* L = a->L;
  const int M = a->M, K = L->K, G = L->G, ngroups = a->ngroups, kind = L->kind;
  int i = 0;
  for (long r = r0; r < r1; r++) {
    while (r >= a->start[i + 1]) i++;
    long n = r - a->start[i];
    float out[4];
    int m_done = 0;
    if (M == 1 && kind == 3 && r + 1 < r1 && r + 1 < a->start[i + 1]) {  // int4, two rows
      const uint16_t* sc = (const uint16_t*)L->aux[i] + n * ngroups;
      const uint16_t* mn = (const uint16_t*)L->aux2[i] + n * ngroups;
      const uint8_t* w = (const uint8_t*)L->W[i] + n * (K / 2);
      row2_i4(K, G, w, w + K / 2, sc, sc + ngroups, mn, mn + ngroups, a->x, a->xs, out);
      a->y[r] = out[0];
      a->y[r + 1] = out[1];
      r++;
      continue;
    }
    if (M >= 4 && kind < 3 && r + 1 < r1 && r + 1 < a->start[i + 1]) {
      // two rows of the same weight at a time for every full block of 4 x rows
      float o2[4];
      for (; m_done + 4 <= M; m_done += 4) {
        const float* xm = a->x + (long)m_done * K;
        if (kind == 0) {
          const float* w = (const float*)L->W[i] + n * K;
          row2_f32(K, w, w + K, xm, K, out, o2);
        } else if (kind == 1) {
          const uint16_t* w = (const uint16_t*)L->W[i] + n * K;
          row2_bf16(K, w, w + K, xm, K, out, o2);
        } else {
          const int8_t* w = (const int8_t*)L->W[i] + n * K;
          row2_i8(K, w, w + K, xm, K, out, o2);
          float s0 = ((const float*)L->aux[i])[n], s1 = ((const float*)L->aux[i])[n + 1];
          for (int m = 0; m < 4; m++) out[m] *= s0, o2[m] *= s1;
        }
        for (int m = 0; m < 4; m++) {
          a->y[(long)(m_done + m) * a->ldy + r] = out[m];
          a->y[(long)(m_done + m) * a->ldy + r + 1] = o2[m];
        }
      }
      if (m_done < M) {  // leftover x rows for both output rows
        for (long rr = r; rr <= r + 1; rr++) {
          long nn = rr - a->start[i];
          for (int m0 = m_done; m0 < M; m0 += 4) {
            int MB = M - m0 < 4 ? M - m0 : 4;
            const float* xm = a->x + (long)m0 * K;
            if (kind == 0) row_f32(K, (const float*)L->W[i] + nn * K, xm, K, MB, out);
            else if (kind == 1) row_bf16(K, (const uint16_t*)L->W[i] + nn * K, xm, K, MB, out);
            else {
              row_i8(K, (const int8_t*)L->W[i] + nn * K, xm, K, MB, out);
              for (int m = 0; m < MB; m++) out[m] *= ((const float*)L->aux[i])[nn];
            }
            for (int m = 0; m < MB; m++) a->y[(long)(m0 + m) * a->ldy + rr] = out[m];
          }
        }
      }
      r++;
      continue;
    }
    for (int m0 = 0; m0 < M; m0 += 4) {
      int MB = M - m0 < 4 ? M - m0 : 4;
      const float* xm = a->x + (long)m0 * K;
      switch (kind) {
        case 0:
          row_f32(K, (const float*)L->W[i] + n * K, xm, K, MB, out);
          break;
        case 1:
          row_bf16(K, (const uint16_t*)L->W[i] + n * K, xm, K, MB, out);
          break;
        case 2: {
          row_i8(K, (const int8_t*)L->W[i] + n * K, xm, K, MB, out);
          float s = ((const float*)L->aux[i])[n];
          for (int m = 0; m < MB; m++) out[m] *= s;
          break;
        }
        default:
          row_i4(K, G, (const uint8_t*)L->W[i] + n * (K / 2),
                 (const uint16_t*)L->aux[i] + n * ngroups,
                 (const uint16_t*)L->aux2[i] + n * ngroups, xm, K, a->xs + m0 * ngroups,
                 ngroups, MB, out);
      }
      for (int m = 0; m < MB; m++) a->y[(long)(m0 + m) * a->ldy + r] = out[m];
    }
  }
}

// ---------------------------------------------------------------- small-M GEMM
// Batched decode (M >= GEMM_MIN_ROWS x rows) is compute-bound, so the loop is register-blocked:
// x is transposed once per call into xT blocks of 16 rows, (K, 16) each, and a tile of
// GEMM_NR weight rows keeps GEMM_NR x 16 outputs in 12 ymm accumulators; every step k
// broadcasts W[n, k] (n in the tile) against xT[k, 0:8] and xT[k, 8:16]: 12 FMAs for 2 vector
// loads and 6 broadcasts, no horizontal sums. K is cut into slices of GEMM_KC columns whose xT
// part (8 KB) stays in L1 while a group of GEMM_GROUP tiles uses it. Float32 weights are read
// in place from their (N, K) rows, or from a copy packed in the order the loop reads them
// (geode_pack: one sequential stream, measured 1.2-1.8x faster than rows here); bf16 / int8 /
// int4 slices are widened (dequantized) into a small float panel first, so each conversion
// serves all M rows. Every weight byte is read once per call; reading rows in place, the
// micro-kernel calls of one group prefetch the next group's weights (the hardware prefetcher
// alone falls behind when the FMA units are busy).
#define GEMM_NR 6        // weight rows per register tile
#define GEMM_KC 128      // columns per slice
#define GEMM_GROUP 8     // tiles sharing one xT slice
#define GEMM_MIN_ROWS 6  // x rows from which the GEMM path beats the per-row kernels
#define GEMM_PACK_AHEAD 16384  // bytes a packed weight stream is prefetched ahead
#ifndef GEMM_SLAB
#define GEMM_SLAB 128  // x rows per pass over the weights (blocks of 16)
#endif

typedef struct {
  const geode_linear* L;
  int M, nblk, ldy;
  const float* xT;  // (nblk, K, 16): xT[(b * K + k) * 16 + m] = x[b * 16 + m, k], zero padded
  float* y;
  long col[MAXW + 1];   // first output column of each weight
  long tile[MAXW + 1];  // first tile of each weight
} gemm_args;

typedef struct {  // cache lines to prefetch: `lines` lines from `base`
  const char* base;
  int lines;
} gemm_pf;

// ct (NR x 16 floats) = [ct +] sum_k w[n][k * WS] * xT[k, :] over kc columns (first: start at
// 0), prefetching pf's lines (may be 0) spread over the kc / 16 rounds. WS: 1 for weight rows,
// GEMM_NR for a packed block (w[n] = block + n).
static inline __attribute__((always_inline)) void gemm_micro(int kc, const float* const* w,
                                                             const float* xT, float* ct,
                                                             int first, const gemm_pf* pf,
                                                             const int NR, const int WS,
                                                             long ahead) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
#define GLOAD(n)                                \
  if (NR > n && !first) {                       \
    c##n##0 = _mm256_loadu_ps(ct + n * 16);     \
    c##n##1 = _mm256_loadu_ps(ct + n * 16 + 8); \
  }
  GLOAD(0) GLOAD(1) GLOAD(2) GLOAD(3) GLOAD(4) GLOAD(5)
#undef GLOAD
  const float* w0 = w[0];
  const float* w1 = NR > 1 ? w[1] : w0;
  const float* w2 = NR > 2 ? w[2] : w0;
  const float* w3 = NR > 3 ? w[3] : w0;
  const float* w4 = NR > 4 ? w[4] : w0;
  const float* w5 = NR > 5 ? w[5] : w0;
#define GSTEP(n)                                  \
  if (NR > n) {                                   \
    __m256 b = _mm256_broadcast_ss(w##n + k * WS); \
    c##n##0 = _mm256_fmadd_ps(b, x0, c##n##0);    \
    c##n##1 = _mm256_fmadd_ps(b, x1, c##n##1);    \
  }
  const int total = pf ? pf->lines : 0, rounds = kc / 16 > 0 ? kc / 16 : 1;
  const int per = (total + rounds - 1) / rounds;
  int line = 0, k = 0;
  for (; k + 16 <= kc;) {
    for (int e = line + per; line < e && line < total; line++)
      _mm_prefetch(pf->base + 64L * line, _MM_HINT_T0);
    if (WS > 1 && ahead)  // a packed stream: the next 16 steps' lines, `ahead` bytes on
      for (int l = 0; l < 16 * WS * 4; l += 64)
        _mm_prefetch((const char*)(w0 + k * WS) + ahead + l, _MM_HINT_T0);
    for (int e = k + 16; k < e; k++) {
      __m256 x0 = _mm256_loadu_ps(xT + 16 * k), x1 = _mm256_loadu_ps(xT + 16 * k + 8);
      GSTEP(0) GSTEP(1) GSTEP(2) GSTEP(3) GSTEP(4) GSTEP(5)
    }
  }
  for (; k < kc; k++) {
    __m256 x0 = _mm256_loadu_ps(xT + 16 * k), x1 = _mm256_loadu_ps(xT + 16 * k + 8);
    GSTEP(0) GSTEP(1) GSTEP(2) GSTEP(3) GSTEP(4) GSTEP(5)
  }
#undef GSTEP
#define GSTORE(n)                               \
  if (NR > n) {                                 \
    _mm256_storeu_ps(ct + n * 16, c##n##0);     \
    _mm256_storeu_ps(ct + n * 16 + 8, c##n##1); \
  }
  GSTORE(0) GSTORE(1) GSTORE(2) GSTORE(3) GSTORE(4) GSTORE(5)
#undef GSTORE
}

static void gemm_micro_nr(int nr, int kc, const float* const* w, const float* xT, float* ct,
                          int first, const gemm_pf* pf) {
  switch (nr) {
    case 1: gemm_micro(kc, w, xT, ct, first, pf, 1, 1, 0); break;
    case 2: gemm_micro(kc, w, xT, ct, first, pf, 2, 1, 0); break;
    case 3: gemm_micro(kc, w, xT, ct, first, pf, 3, 1, 0); break;
    case 4: gemm_micro(kc, w, xT, ct, first, pf, 4, 1, 0); break;
    case 5: gemm_micro(kc, w, xT, ct, first, pf, 5, 1, 0); break;
    default: gemm_micro(kc, w, xT, ct, first, pf, 6, 1, 0); break;
  }
}

// The same over a packed block (kc, GEMM_NR), prefetching `ahead` bytes past it (0: none).
static void gemm_micro_packed(int kc, const float* block, const float* xT, float* ct, int first,
                              long ahead) {
  const float* w[GEMM_NR] = {block, block + 1, block + 2, block + 3, block + 4, block + 5};
  gemm_micro(kc, w, xT, ct, first, 0, GEMM_NR, GEMM_NR, ahead);
}

// Packed layout (geode_pack): rows padded with zeros to whole tiles of GEMM_NR; tiles in
// aligned groups of GEMM_GROUP (the last may be shorter); a group holds, slice after slice of
// GEMM_KC columns, each tile's block (kc, GEMM_NR): element (k, n) at block[k * GEMM_NR + n].
// The GEMM then reads each weight as one sequential stream, which this CPU's prefetchers keep
// up with (a tile's rows read side by side are GEMM_NR streams).
long geode_pack_size(int N, int K) { return (long)(N + GEMM_NR - 1) / GEMM_NR * GEMM_NR * K; }

// Offset (elements) of tile tw's block for the slice at column k0 (kc columns), in a weight of
// `tiles` tiles and K columns.
static inline long pack_offset(long tw, long tiles, int K, int k0, int kc) {
  long a = tw / GEMM_GROUP, nt = tiles - a * GEMM_GROUP;
  if (nt > GEMM_GROUP) nt = GEMM_GROUP;
  return a * GEMM_GROUP * GEMM_NR * K + (long)k0 * nt * GEMM_NR + (tw % GEMM_GROUP) * kc * GEMM_NR;
}

// P (geode_pack_size(N, K) elements) = W (N, K) in the packed layout; kind 0 f32, 1 bf16.
int geode_pack(int kind, int N, int K, const void* W, void* P) {
  if ((kind != 0 && kind != 1) || N < 1 || K < 1) return -1;
  const long tiles = (N + GEMM_NR - 1) / GEMM_NR;
  for (long tw = 0; tw < tiles; tw++)
    for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
      const int kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
      const long off = pack_offset(tw, tiles, K, k0, kc);
      for (int n = 0; n < GEMM_NR; n++) {
        const long row = tw * GEMM_NR + n;
        for (int k = 0; k < kc; k++) {
          long dst = off + (long)k * GEMM_NR + n, src = row * K + k0 + k;
          if (kind == 0) ((float*)P)[dst] = row < N ? ((const float*)W)[src] : 0.0f;
          else ((uint16_t*)P)[dst] = row < N ? ((const uint16_t*)W)[src] : 0;
        }
      }
    }
  return 0;
}

// Rows n0 .. n0+nr of weight i, columns k0 .. k0+kc, as float32 into panel (nr, GEMM_KC).
static void gemm_panel(const geode_linear* L, int i, long n0, int nr, int k0, int kc,
                       float* panel) {
  const long K = L->K;
  for (int n = 0; n < nr; n++) {
    float* dst = panel + n * GEMM_KC;
    long row = n0 + n;
    int k = 0;
    if (L->kind == 1) {
      const uint16_t* src = (const uint16_t*)L->W[i] + row * K + k0;
      for (; k + 8 <= kc; k += 8) _mm256_storeu_ps(dst + k, load_bf16(src + k));
      for (; k < kc; k++) dst[k] = bf16_to_f32(src[k]);
    } else if (L->kind == 2) {
      const int8_t* src = (const int8_t*)L->W[i] + row * K + k0;
      float s = ((const float*)L->aux[i])[row];
      __m256 sv = _mm256_set1_ps(s);
      for (; k + 8 <= kc; k += 8) _mm256_storeu_ps(dst + k, _mm256_mul_ps(load_i8(src + k), sv));
      for (; k < kc; k++) dst[k] = src[k] * s;
    } else {  // int4: k0 and kc are multiples of 32 (K % G == 0, G % 32 == 0)
      const int G = L->G, ng = (int)(K / G);
      const uint8_t* src = (const uint8_t*)L->W[i] + row * (K / 2);
      const uint16_t* sc = (const uint16_t*)L->aux[i] + row * ng;
      const uint16_t* mn = (const uint16_t*)L->aux2[i] + row * ng;
      const __m256i low = _mm256_set1_epi32(0x0F);
      for (; k < kc; k += 32) {
        int kk = k0 + k, g = kk / G;
        __m256 s = _mm256_set1_ps(_cvtsh_ss(sc[g])), m = _mm256_set1_ps(_cvtsh_ss(mn[g]));
        __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(src + kk / 2)));
        __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(src + kk / 2 + 8)));
#define I4_STORE(OFF, Q) \
  _mm256_storeu_ps(dst + k + OFF, _mm256_fmadd_ps(_mm256_cvtepi32_ps(Q), s, m));
        I4_STORE(0, _mm256_and_si256(v0, low))
        I4_STORE(8, _mm256_and_si256(v1, low))
        I4_STORE(16, _mm256_srli_epi32(v0, 4))
        I4_STORE(24, _mm256_srli_epi32(v1, 4))
#undef I4_STORE
      }
    }
  }
}

// Output columns staged per thread before they go to y: y rows are ldy apart, and scattering
// each tile's 6 columns over 16 rows that often share cache sets (ldy a multiple of 1024)
// costs conflict misses; runs of GEMM_STAGE columns per row do not.
#define GEMM_STAGE (GEMM_GROUP * GEMM_NR)

static void gemm_flush(const gemm_args* a, const float* stage, long col, int n) {
  for (int m = 0; m < a->M; m++)
    memcpy(a->y + (long)m * a->ldy + col, stage + m * GEMM_STAGE, sizeof(float) * n);
}

// Weight i, first row n0 and row count of tile t.
static inline void gemm_tile_rows(const gemm_args* a, long t, int* i, long* n0, int* nr) {
  while (t >= a->tile[*i + 1]) (*i)++;
  *n0 = (t - a->tile[*i]) * GEMM_NR;
  long left = a->L->N[*i] - *n0;
  *nr = left < GEMM_NR ? (int)left : GEMM_NR;
}

static void gemm_tiles(const void* p, long t0, long t1) {
  const gemm_args* a = (const gemm_args*)p;
  const geode_linear* L = a->L;
  const int K = L->K, kind = L->kind;
  const long row_bytes = kind == 0 ? 4L * K : kind == 1 ? 2L * K : kind == 2 ? K : K / 2;
  float panel[GEMM_NR * GEMM_KC];
  float ct[GEMM_GROUP * (GEMM_SLAB / 16) * GEMM_NR * 16];  // per tile of the group and 16-row
                                                          // block of x
  float stage[GEMM_SLAB * GEMM_STAGE];
  const float* w[GEMM_NR];
  int i = 0;
  for (long t = t0; t < t1;) {
    while (t >= a->tile[i + 1]) i++;
    long end = t + GEMM_GROUP;  // a group: consecutive tiles of one weight
    if (end > t1) end = t1;
    if (end > a->tile[i + 1]) end = a->tile[i + 1];
    const int packed = L->P[i] != 0;
    if (packed) {  // inside one aligned group of the packed layout
      long g_end = a->tile[i] + ((t - a->tile[i]) / GEMM_GROUP + 1) * GEMM_GROUP;
      if (end > g_end) end = g_end;
    }
    const int tg = (int)(end - t);
    for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
      const int kn = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
      for (int j = 0; j < tg; j++) {
        int ti = i, nr;
        long n0;
        gemm_tile_rows(a, t + j, &ti, &n0, &nr);
        if (packed) {
          long tiles = a->tile[ti + 1] - a->tile[ti];
          long off = pack_offset(n0 / GEMM_NR, tiles, K, k0, kn);
          const float* block = (const float*)L->P[ti] + off;
          long ahead = GEMM_PACK_AHEAD;
          if (kind == 1) {  // bfloat16 block -> float32 panel, one sequential run
            const uint16_t* src = (const uint16_t*)L->P[ti] + off;
            int e = 0, total = kn * GEMM_NR;
            for (; e + 32 <= total; e += 32) {
              _mm_prefetch((const char*)(src + e) + GEMM_PACK_AHEAD / 2, _MM_HINT_T0);
              for (int q = 0; q < 32; q += 8) _mm256_storeu_ps(panel + e + q, load_bf16(src + e + q));
            }
            for (; e < total; e++) panel[e] = bf16_to_f32(src[e]);
            block = panel, ahead = 0;
          }
          for (int b = 0; b < a->nblk; b++)
            gemm_micro_packed(kn, block, a->xT + ((long)b * K + k0) * 16,
                              ct + (j * a->nblk + b) * GEMM_NR * 16, k0 == 0, b == 0 ? ahead : 0);
          continue;
        }
        if (kind == 0) {
          for (int n = 0; n < nr; n++) w[n] = (const float*)L->W[ti] + (n0 + n) * K + k0;
        } else {
          gemm_panel(L, ti, n0, nr, k0, kn, panel);
          for (int n = 0; n < nr; n++) w[n] = panel + n * GEMM_KC;
        }
        // prefetch the next group's weight rows (contiguous), spread over this group's calls:
        // far enough ahead to cover the memory latency
        gemm_pf pf = {0, 0};
        if (end < t1) {
          int pi = ti, pnr;
          long pn0;
          gemm_tile_rows(a, end, &pi, &pn0, &pnr);
          long rows = L->N[pi] - pn0 < GEMM_STAGE ? L->N[pi] - pn0 : GEMM_STAGE;
          long lines = (rows * row_bytes + 63) / 64;
          int calls = tg * ((K + GEMM_KC - 1) / GEMM_KC), call = (k0 / GEMM_KC) * tg + j;
          long per = (lines + calls - 1) / calls, first = call * per;
          if (first < lines) {
            pf.lines = (int)(first + per <= lines ? per : lines - first);
            pf.base = (const char*)L->W[pi] + pn0 * row_bytes + 64 * first;
          }
        }
        for (int b = 0; b < a->nblk; b++)
          gemm_micro_nr(nr, kn, w, a->xT + ((long)b * K + k0) * 16,
                        ct + (j * a->nblk + b) * GEMM_NR * 16, k0 == 0, b == 0 ? &pf : 0);
      }
    }
    // the group's outputs: columns col .. col + rows, staged then written in row runs
    long col = a->col[i] + (t - a->tile[i]) * GEMM_NR;
    int cols = 0;
    for (int j = 0; j < tg; j++) {
      int ti = i, nr;
      long n0;
      gemm_tile_rows(a, t + j, &ti, &n0, &nr);
      for (int b = 0; b < a->nblk; b++) {
        const float* c = ct + (j * a->nblk + b) * GEMM_NR * 16;
        for (int m = 0; m < 16 && b * 16 + m < a->M; m++)
          for (int n = 0; n < nr; n++) stage[(b * 16 + m) * GEMM_STAGE + cols + n] = c[n * 16 + m];
      }
      cols += nr;
    }
    gemm_flush(a, stage, col, cols);
    t = end;
  }
}

// The calling thread's xT buffer (grown as needed, kept for reuse).
static __thread float* xt_buf = 0;
static __thread long xt_cap = 0;

// 8 x 8 transpose in registers: r[i] holds row i, afterwards column i.
static inline void transpose8(__m256 r[8]) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// xT (K, 16) = the first `rows` (<= 16) rows of x (rows, K) transposed, zero padded.
static void pack_xT(const float* x, int rows, int K, float* xT) {
  int k = 0;
  for (; k + 8 <= K; k += 8)
    for (int h = 0; h < 2; h++) {  // x rows 8h .. 8h+7 -> lanes 8h .. 8h+7 of xT rows k .. k+7
      __m256 r[8];
      for (int i = 0; i < 8; i++)
        r[i] = 8 * h + i < rows ? _mm256_loadu_ps(x + (long)(8 * h + i) * K + k)
                                : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; i++) _mm256_storeu_ps(xT + (long)(k + i) * 16 + 8 * h, r[i]);
    }
  for (; k < K; k++)
    for (int m = 0; m < 16; m++) xT[(long)k * 16 + m] = m < rows ? x[(long)m * K + k] : 0.0f;
}

static int gemm_slab(const geode_linear* L, int M, const float* x, float* y, int ldy,
                     int nthreads) {
  const int K = L->K, nblk = (M + 15) / 16;
  if (nblk > GEMM_SLAB / 16) return -1;
  long need = (long)nblk * K * 16;
  if (need > xt_cap) {
    free(xt_buf);
    xt_buf = (float*)aligned_alloc(64, ((need * 4 + 63) / 64) * 64);
    xt_cap = xt_buf ? need : 0;
    if (!xt_buf) return -3;
  }
  for (int b = 0; b < nblk; b++) pack_xT(x + (long)b * 16 * K, M - b * 16 < 16 ? M - b * 16 : 16,
                                        K, xt_buf + (long)b * K * 16);
  gemm_args a = {L, M, nblk, ldy, xt_buf, y, {0}, {0}};
  for (int i = 0; i < L->nw; i++) {
    a.col[i + 1] = a.col[i] + L->N[i];
    a.tile[i + 1] = a.tile[i] + (L->N[i] + GEMM_NR - 1) / GEMM_NR;
  }
  long tiles = a.tile[L->nw];
  long chunk = tiles / (8L * (nthreads > 0 ? nthreads : 1));
  long cap = 1000000L / (2L * GEMM_NR * K * M);  // about 1 MFLOP (~20 us) per chunk at most
  if (chunk > cap) chunk = cap;
  if (chunk < 1) chunk = 1;
  if (L->P[0]) chunk = (chunk + GEMM_GROUP - 1) / GEMM_GROUP * GEMM_GROUP;  // whole groups
  pool_run(gemm_tiles, &a, tiles, chunk, nthreads);
  return 0;
}

// Any number of x rows: slabs of GEMM_SLAB rows, each one pass over the weights.
static int gemm_run(const geode_linear* L, int M, const float* x, float* y, int ldy,
                    int nthreads) {
  int rc = 0;
  for (int m0 = 0; m0 < M && !rc; m0 += GEMM_SLAB) {
    int ms = M - m0 < GEMM_SLAB ? M - m0 : GEMM_SLAB;
    rc = gemm_slab(L, ms, x + (long)m0 * L->K, y + (long)m0 * ldy, ldy, nthreads);
  }
  return rc;
}

// y = x W^T for one linear (see geode_linear). Returns 0, or < 0 for unsupported shapes.
static int linear_run(const geode_linear* L, int M, const float* x, float* y, int ldy,
                      int nthreads) {
  if (L->nw < 1 || L->nw > MAXW || M < 1) return -1;
  const int K = L->K, G = L->G;
  if (L->kind == 3 && (G <= 0 || K % G || G % 32 || K / G > 1024)) return -2;
  if (M >= GEMM_MIN_ROWS) return gemm_run(L, M, x, y, ldy, nthreads);
  gemv_args a = {L, M, 0, ldy, x, 0, {0}, y};
  long total = 0;
  for (int i = 0; i < L->nw; i++) {
    a.start[i] = total;
    total += L->N[i];
  }
  a.start[L->nw] = total;
  float xs[GEMM_MIN_ROWS * 1024];  // int4: per-group sums of x, (M, K/G)
  if (L->kind == 3) {
    int ngroups = K / G;
    for (int m = 0; m < M; m++)
      for (int g = 0; g < ngroups; g++) {
        float s = 0;
        for (int j = 0; j < G; j++) s += x[(long)m * K + g * G + j];
        xs[m * ngroups + g] = s;
      }
    a.ngroups = ngroups;
    a.xs = xs;
  }
  // Chunks of >= 16 rows, about 8 per thread: helpers that wake late still find work, and a
  // helper preempted mid-chunk holds the caller for one small chunk at most.
  long chunk = total / (8L * (nthreads > 0 ? nthreads : 1));
  long cap = (262144L / K) * 4 / (M < 4 ? 1 : M / 4);  // ~1 MB of float32 weights, less per row
  if (chunk > cap) chunk = cap;                          // when several x rows share it
  if (chunk < 16) chunk = 16;
  if ((long)K * M * total < 32768) nthreads = 1;  // too small to share
  pool_run(gemv_rows, &a, total, chunk, nthreads);
  return 0;
}

int geode_gemv(int kind, int M, int K, const float* x, int nw, const void** W, const int* N,
               float* y, int ldy, const void** aux, const void** aux2, int G, const void** P,
               int nthreads) {
  if (nw < 1 || nw > MAXW) return -1;
  geode_linear L = {kind, K, G, nw, {0}, {0}, {0}, {0}, {0}};
  for (int i = 0; i < nw; i++) {
    L.N[i] = N[i];
    L.W[i] = W[i];
    L.aux[i] = aux ? aux[i] : 0;
    L.aux2[i] = aux2 ? aux2[i] : 0;
    L.P[i] = P ? P[i] : 0;
    if ((L.P[i] != 0) != (L.P[0] != 0) || (L.P[i] && kind > 1)) return -1;
  }
  return linear_run(&L, M, x, y, ldy, nthreads);
}

// ---------------------------------------------------------------- norms and rotary embeddings
static inline float rms_scale(const float* x, int d, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int k = 0;
  for (; k + 8 <= d; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (; k < d; k++) ss += x[k] * x[k];
  return 1.0f / sqrtf(ss / d + eps);
}

// Gemma RMSNorm of `rows` rows of width d (row stride ldx): out = x / rms(x) * scale, with scale
// = 1 + w precomputed; out is (rows, d) contiguous.
void geode_rmsnorm(int rows, int d, const float* x, int ldx, const float* scale, float eps,
                   float* out) {
  for (int r = 0; r < rows; r++) {
    const float* xr = x + (long)r * ldx;
    float* o = out + (long)r * d;
    float inv = rms_scale(xr, d, eps);
    __m256 iv = _mm256_set1_ps(inv);
    int k = 0;
    for (; k + 8 <= d; k += 8)
      _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), iv),
                                            _mm256_loadu_ps(scale + k)));
    for (; k < d; k++) o[k] = xr[k] * inv * scale[k];
  }
}

// QK-norm then RoPE (half-split layout) for `rows` tokens x `heads` heads of width d:
// x row r (stride ldx) holds heads*d values; cos/sin are (rows, d); out is (rows, heads, d).
//   y = x / rms(x) * scale;  out[i] = y[i] c[i] - y[i+h] s[i];  out[i+h] = y[i+h] c[i+h] + y[i] s[i+h]
void geode_norm_rope(int rows, int heads, int d, const float* x, int ldx, const float* scale,
                     float eps, const float* cos, const float* sin, float* out) {
  int h = d / 2;
  float y[1024];
  for (int r = 0; r < rows; r++) {
    const float* c = cos + (long)r * d;
    const float* s = sin + (long)r * d;
    for (int hd = 0; hd < heads; hd++) {
      const float* xr = x + (long)r * ldx + hd * d;
      float* o = out + ((long)r * heads + hd) * d;
      float inv = rms_scale(xr, d, eps);
      for (int k = 0; k < d; k++) y[k] = xr[k] * inv * scale[k];
      for (int i = 0; i < h; i++) {
        o[i] = y[i] * c[i] - y[i + h] * s[i];
        o[i + h] = y[i + h] * c[i + h] + y[i] * s[i + h];
      }
    }
  }
}

// q and k of one attention layer in one call (see geode_norm_rope): q rows (stride ldq) hold
// hq heads, k rows (stride ldk) hold hk heads; outputs (rows, hq, d) and (rows, hk, d).
void geode_qk_norm_rope(int rows, int hq, int hk, int d, const float* q, int ldq, const float* k,
                        int ldk, const float* scale_q, const float* scale_k, float eps,
                        const float* cos, const float* sin, float* out_q, float* out_k) {
  geode_norm_rope(rows, hq, d, q, ldq, scale_q, eps, cos, sin, out_q);
  geode_norm_rope(rows, hk, d, k, ldk, scale_k, eps, cos, sin, out_k);
}

// ---------------------------------------------------------------- vector math
// exp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6 polynomial
// (the Cephes expf coefficients); relative error ~2 ulp on [-87, 88], inputs clamped there.
static inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// tanh: odd polynomial below |x| 0.625 (Cephes tanhf), else 1 - 2 / (exp(2|x|) + 1).
static inline __m256 tanh256(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 ax = _mm256_andnot_ps(sign, x);
  __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                             _mm256_div_ps(_mm256_set1_ps(2.0f),
                                           _mm256_add_ps(exp256(_mm256_add_ps(ax, ax)),
                                                         _mm256_set1_ps(1.0f))));
  big = _mm256_or_ps(big, _mm256_and_ps(sign, x));
  __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  return _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}

// GELU with the tanh approximation: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)),
// u = sqrt(2/pi) (x + 0.044715 x^3).
static inline __m256 gelu_tanh256(__m256 x) {
  __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                           _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
  __m256 e = exp256(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// In place: v[i] = c * tanh(v[i] / c) (logit soft-capping).
static void softcap_inplace(float* v, long n, float c) {
  __m256 cv = _mm256_set1_ps(c), ic = _mm256_set1_ps(1.0f / c);
  long i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(v + i, _mm256_mul_ps(cv, tanh256(_mm256_mul_ps(_mm256_loadu_ps(v + i), ic))));
  for (; i < n; i++) v[i] = c * tanhf(v[i] / c);
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// ---------------------------------------------------------------- native decode step
// One call runs the whole decoder for B sequences at one new token each, straight to logits,
// with the weights, norms and KV-cache buffers of the engine (pointers collected once by
// geode/infer/native.py). Activations stay float32 whatever the weight format; the cache is
// float32 or bfloat16 (keys/values rounded to nearest-even when stored, as torch does).
typedef struct {
  geode_linear qkv, o, gate_up, down;  // [q | k | v], o, [gate | up], down
  const void* norm[4];  // input, post-attention, pre-feedforward, post-feedforward (hidden,)
  const void* q_norm;   // (head_dim,)
  const void* k_norm;
  void* k_cache;  // (rows, kv_heads, slots, head_dim) float32 or bfloat16
  void* v_cache;
  int slots;   // slots per row and head: the capacity (global layer) or the ring size (local)
  int window;  // sliding window of a local layer; 0 for a global layer
} geode_layer;

typedef struct {
  int n_layers, hidden, heads, kv_heads, head_dim, inter, vocab;
  int float_kind;   // embedding table and norm weights: 0 float32, 1 bfloat16
  int cache_kind;   // KV cache: 0 float32, 1 bfloat16
  int act;          // 0: gelu, tanh approximation; 1: gelu (erf)
  int embed_round;  // round the scaled embedding to bfloat16 (what a bf16 model computes)
  float eps, embed_scale, attn_scale, attn_softcap, final_softcap;  // softcap 0: none
  const void* embed;       // (vocab, hidden)
  const void* final_norm;  // (hidden,)
  geode_linear head;       // hidden -> vocab
  const float* inv_freq[2];  // RoPE inverse frequencies (head_dim/2,): [local, global] layers
  int64_t* pos_table[2];     // position held by each slot, -1 empty: [local (rows, ring),
                             // global (rows, capacity)], shared by the layers of a kind
  int capacity, ring, rows;
  const geode_layer* layer;  // (n_layers,)
} geode_model;

// Workspace layout, floats per token: x, xn, tmp (hidden each), qkv, q, knew (the token's keys
// after QK-norm and RoPE), att, gate_up, act, rope (cos and sin of both kinds: 2 * head_dim),
// xw (the head's input rows, one per wanted token).
typedef struct {
  float *x, *xn, *tmp, *qkv, *q, *knew, *att, *gu, *act, *rope, *xw;
} step_work;

static long work_layout(const geode_model* m, int N, float* base, step_work* w) {
  long h = m->hidden, D = m->head_dim, nqkv = (long)(m->heads + 2 * m->kv_heads) * D;
  long sizes[11] = {h, h, h, nqkv, (long)m->heads * D, (long)m->kv_heads * D, (long)m->heads * D,
                    2L * m->inter, m->inter, 2 * D, h};
  float** slot[11] = {&w->x,  &w->xn, &w->tmp, &w->qkv, &w->q,  &w->knew,
                      &w->att, &w->gu, &w->act, &w->rope, &w->xw};
  long off = 0;
  for (int i = 0; i < 11; i++) {
    if (base) *slot[i] = base + off;
    off += ((N * sizes[i] + 15) / 16) * 16;  // 64-byte aligned parts
  }
  return off;
}

long geode_run_workspace(const geode_model* m, int N) { return work_layout(m, N, 0, 0); }

static inline __m256 load_w8(const void* w, int kind, long k) {  // 8 norm weights as float
  return kind ? load_bf16((const uint16_t*)w + k) : _mm256_loadu_ps((const float*)w + k);
}
static inline float load_w1(const void* w, int kind, long k) {
  return kind ? bf16_to_f32(((const uint16_t*)w)[k]) : ((const float*)w)[k];
}

// Gemma RMSNorm of one row: out = x / rms(x) * (1 + w), or out += that (residual add).
static void norm_row(const float* x, int d, const void* w, int kind, float eps, float* out,
                     int add) {
  float inv = rms_scale(x, d, eps);
  __m256 iv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.0f);
  int k = 0;
  for (; k + 8 <= d; k += 8) {
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), iv),
                             _mm256_add_ps(one, load_w8(w, kind, k)));
    if (add) y = _mm256_add_ps(_mm256_loadu_ps(out + k), y);
    _mm256_storeu_ps(out + k, y);
  }
  for (; k < d; k++) {
    float y = x[k] * inv * (1.0f + load_w1(w, kind, k));
    out[k] = add ? out[k] + y : y;
  }
}

// QK-norm then RoPE (half-split) of one head: out[i] = y[i] c[i] - y[i+h] s[i],
// out[i+h] = y[i+h] c[i] + y[i] s[i], with cs = [cos (D/2) | sin (D/2)].
static void norm_rope_head(const float* x, int D, const void* w, int kind, float eps,
                           const float* cs, float* out) {
  float y[1024];
  norm_row(x, D, w, kind, eps, y, 0);
  int h = D / 2;
  const float *c = cs, *s = cs + h;
  for (int i = 0; i < h; i++) {
    out[i] = y[i] * c[i] - y[i + h] * s[i];
    out[i + h] = y[i + h] * c[i] + y[i] * s[i];
  }
}

static inline float dot_f32(const float* a, const float* b, int n) {
  __m256 acc = _mm256_setzero_ps(), acc2 = acc;
  int k = 0;
  for (; k + 16 <= n; k += 16) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc2);
  }
  for (; k + 8 <= n; k += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  float s = hsum(_mm256_add_ps(acc, acc2));
  for (; k < n; k++) s += a[k] * b[k];
  return s;
}

static inline void axpy_f32(float a, const float* x, float* y, int n) {  // y += a x
  __m256 av = _mm256_set1_ps(a);
  int k = 0;
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(y + k, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k)));
  for (; k < n; k++) y[k] += a * x[k];
}

static inline const float* cache_vec(const void* base, int kind, long off, int D, float* tmp) {
  if (!kind) return (const float*)base + off;
  const uint16_t* p = (const uint16_t*)base + off;
  int k = 0;
  for (; k + 8 <= D; k += 8) _mm256_storeu_ps(tmp + k, load_bf16(p + k));
  for (; k < D; k++) tmp[k] = bf16_to_f32(p[k]);
  return tmp;
}

// Attention of a run (geode_run): tokens grouped in segments, one per cache row, with consecutive
// positions continuing what the row holds. A query block is up to `qb` consecutive tokens of one
// segment; an item is (query block, kv head).
typedef struct {
  const geode_model* m;
  const geode_layer* L;
  const int32_t* rows;  // (N,) cache row of each token
  const int64_t* pos;   // (N,)
  const int* seg_of;    // (N,) segment of each token
  const int* seg_start; // (nseg + 1,) first token of each segment
  const int* blocks;    // (nblocks,) first token of each query block
  int nblocks, qb;
  long nqkv;
  const float* q;     // (N, heads, D)
  const float* knew;  // (N, kv_heads, D)
  const float* qkv;   // (N, nqkv): values at column (heads + kv_heads) D
  float* out;         // (N, heads D)
} attn_args;

#define ATT_BLOCK 32
#define ATT_MAX_Q 64         // query heads (tokens x heads per kv head) of one item
#define ATT_MAX_ACC 16384    // their accumulators, floats (ATT_MAX_Q x head_dim at most)

// Query block qa .. qa+qn-1 (one segment) and kv head g, with G = heads / kv_heads query heads
// per token: NQ = qn G "query heads" attend, with an online softmax over blocks of ATT_BLOCK keys
// (each key and value read once for all of them), to
//   - the row's cached slots holding positions p' < p0 (p0: the segment's first position), and
//   - the segment's own new keys (workspace) at positions <= the block's last position,
// each query at position p seeing only keys p' <= p with p - p' < window on a local layer (the
// mask of `attention_mask`). The cache is written after all items of the layer ran.
// acc rows r < nr (row stride D) += sum_j p[j * 16 + r] v_j, 16 columns at a time in registers
// (each value load feeds up to 12 FMAs), the D % 16 tail in scalar code.
static inline __attribute__((always_inline)) void pv_tile_nr(int n, const float* p,
                                                             const float* const* vj, float* acc,
                                                             int D, const int NR) {
  int d = 0;
  for (; d + 16 <= D; d += 16) {
    __m256 c[6][2];
    for (int r = 0; r < NR; r++)
      c[r][0] = _mm256_loadu_ps(acc + (long)r * D + d), c[r][1] = _mm256_loadu_ps(acc + (long)r * D + d + 8);
    for (int j = 0; j < n; j++) {
      __m256 x0 = _mm256_loadu_ps(vj[j] + d), x1 = _mm256_loadu_ps(vj[j] + d + 8);
      for (int r = 0; r < NR; r++) {
        __m256 b = _mm256_broadcast_ss(p + j * 16 + r);
        c[r][0] = _mm256_fmadd_ps(b, x0, c[r][0]);
        c[r][1] = _mm256_fmadd_ps(b, x1, c[r][1]);
      }
    }
    for (int r = 0; r < NR; r++)
      _mm256_storeu_ps(acc + (long)r * D + d, c[r][0]), _mm256_storeu_ps(acc + (long)r * D + d + 8, c[r][1]);
  }
  for (; d < D; d++)
    for (int r = 0; r < NR; r++) {
      float s = acc[(long)r * D + d];
      for (int j = 0; j < n; j++) s += p[j * 16 + r] * vj[j][d];
      acc[(long)r * D + d] = s;
    }
}

static void pv_tile(int n, const float* p, const float* const* vj, float* acc, int D, int nr) {
  switch (nr) {
    case 1: pv_tile_nr(n, p, vj, acc, D, 1); break;
    case 2: pv_tile_nr(n, p, vj, acc, D, 2); break;
    case 3: pv_tile_nr(n, p, vj, acc, D, 3); break;
    case 4: pv_tile_nr(n, p, vj, acc, D, 4); break;
    case 5: pv_tile_nr(n, p, vj, acc, D, 5); break;
    default: pv_tile_nr(n, p, vj, acc, D, 6); break;
  }
}

static void attend_block(const attn_args* a, int qa, int qn, int g) {
  const geode_model* m = a->m;
  const geode_layer* L = a->L;
  const int D = m->head_dim, H = m->heads, Hkv = m->kv_heads, G = H / Hkv, W = L->window;
  const int NQ = qn * G, NB = (NQ + 15) / 16, seg = a->seg_of[qa], s0 = a->seg_start[seg];
  const long row = a->rows[qa], p0 = a->pos[s0], pmin = a->pos[qa];
  const int64_t* tab;
  long lo, hi;
  if (W == 0) {
    tab = m->pos_table[1] + row * m->capacity;
    lo = 0, hi = p0;
  } else {
    tab = m->pos_table[0] + row * m->ring;
    if (p0 <= L->slots) lo = pmin - W + 1 > 0 ? pmin - W + 1 : 0, hi = p0;  // slot = pos
    else lo = 0, hi = L->slots;
  }
  const long base = (row * Hkv + g) * (long)L->slots * D;
  // query heads i = token * G + head, in blocks of 16 lanes: qT (D, 16) per block, scaled
  float acc[ATT_MAX_ACC], qT[ATT_MAX_Q / 16][256 * 16], S[ATT_BLOCK * 16];
  float mx[ATT_MAX_Q], l[ATT_MAX_Q], qpos[ATT_MAX_Q];
  float kb[ATT_BLOCK * 256], vb[ATT_BLOCK * 256];  // bf16 cache: the block widened (D <= 256)
  for (int i = 0; i < NB * 16; i++) {
    mx[i] = -1e30f, l[i] = 0;
    qpos[i] = i < NQ ? (float)a->pos[qa + i / G] : -1.0f;  // padding lanes see no key
    float* col = qT[i / 16] + i % 16;
    if (i < NQ) {
      const float* q = a->q + ((long)(qa + i / G) * H + (long)g * G + i % G) * D;
      for (int d = 0; d < D; d++) col[d * 16] = q[d] * m->attn_scale;
    } else {
      for (int d = 0; d < D; d++) col[d * 16] = 0;
    }
  }
  memset(acc, 0, sizeof(float) * NQ * D);
  long first_new = W && pmin - W + 1 > p0 ? pmin - W + 1 : p0;
  int j_new = s0 + (int)(first_new - p0), j_end = qa + qn;
  long slot = lo;
  const long oldest = W ? pmin - W : -1;  // old keys must be newer than this
  const __m256 neg = _mm256_set1_ps(-1e30f), wv = _mm256_set1_ps((float)W);
  while (slot < hi || j_new < j_end) {
    const float* kj[ATT_BLOCK];
    const float* vj[ATT_BLOCK];
    float kp[ATT_BLOCK];
    int n = 0;
    for (; slot < hi && n < ATT_BLOCK; slot++) {
      int64_t t = tab[slot];
      if (t >= 0 && t < p0 && t > oldest) {
        long off = base + slot * D;
        kj[n] = cache_vec(L->k_cache, m->cache_kind, off, D, kb + (m->cache_kind ? (long)n * D : 0));
        vj[n] = cache_vec(L->v_cache, m->cache_kind, off, D, vb + (m->cache_kind ? (long)n * D : 0));
        kp[n++] = (float)t;
      }
    }
    if (slot >= hi)
      for (; j_new < j_end && n < ATT_BLOCK; j_new++) {
        kj[n] = a->knew + ((long)j_new * Hkv + g) * D;
        vj[n] = a->qkv + (long)j_new * a->nqkv + (long)(H + Hkv + g) * D;
        kp[n++] = (float)a->pos[j_new];
      }
    if (!n) continue;
    for (int bq = 0; bq < NB; bq++) {
      // S (n, 16) = keys . queries: the GEMM micro-kernel, six keys per call
      for (int j0 = 0; j0 < n; j0 += GEMM_NR) {
        int nr = n - j0 < GEMM_NR ? n - j0 : GEMM_NR;
        gemm_micro_nr(nr, D, kj + j0, qT[bq], S + j0 * 16, 1, 0);
      }
      if (m->attn_softcap > 0) softcap_inplace(S, (long)n * 16, m->attn_softcap);
      // online softmax per lane (query head), masked keys excluded
      for (int h8 = 0; h8 < 16; h8 += 8) {
        const int i0 = bq * 16 + h8;
        __m256 qp = _mm256_loadu_ps(qpos + i0), bm = neg;
        for (int j = 0; j < n; j++) {
          __m256 kv = _mm256_set1_ps(kp[j]);
          __m256 bad = _mm256_cmp_ps(kv, qp, _CMP_GT_OQ);
          if (W) bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(qp, kv), wv, _CMP_GE_OQ));
          __m256 s = _mm256_blendv_ps(_mm256_loadu_ps(S + j * 16 + h8), neg, bad);
          _mm256_storeu_ps(S + j * 16 + h8, s);
          bm = _mm256_max_ps(bm, s);
        }
        __m256 old = _mm256_loadu_ps(mx + i0), nm = _mm256_max_ps(old, bm);
        __m256 corr = exp256(_mm256_sub_ps(old, nm)), sum = _mm256_setzero_ps();
        _mm256_storeu_ps(mx + i0, nm);
        for (int j = 0; j < n; j++) {
          __m256 s = _mm256_loadu_ps(S + j * 16 + h8);
          __m256 p = _mm256_andnot_ps(_mm256_cmp_ps(s, neg, _CMP_EQ_OQ),
                                      exp256(_mm256_sub_ps(s, nm)));
          _mm256_storeu_ps(S + j * 16 + h8, p);
          sum = _mm256_add_ps(sum, p);
        }
        _mm256_storeu_ps(l + i0, _mm256_fmadd_ps(_mm256_loadu_ps(l + i0), corr, sum));
        float c[8];
        _mm256_storeu_ps(c, corr);
        for (int e = 0; e < 8 && i0 + e < NQ; e++)
          if (c[e] != 1.0f) {
            float* ah = acc + (long)(i0 + e) * D;
            for (int d = 0; d < D; d++) ah[d] *= c[e];
          }
      }
      // acc[i] += sum_j S[j][i] v_j: tiles of 6 query heads x 16 columns in registers
      for (int t0 = 0; t0 < 16 && bq * 16 + t0 < NQ; t0 += 6) {
        const int i0 = bq * 16 + t0;
        int nr = 16 - t0 < 6 ? 16 - t0 : 6;
        if (NQ - i0 < nr) nr = NQ - i0;
        pv_tile(n, S + t0, vj, acc + (long)i0 * D, D, nr);
      }
    }
  }
  for (int i = 0; i < NQ; i++) {
    float* o = a->out + ((long)(qa + i / G) * H + (long)g * G + i % G) * D;
    float inv = l[i] > 0 ? 1.0f / l[i] : 0.0f;
    for (int d = 0; d < D; d++) o[d] = acc[(long)i * D + d] * inv;
  }
}

static void attn_items(const void* p, long i0, long i1) {
  const attn_args* a = (const attn_args*)p;
  const int Hkv = a->m->kv_heads;
  for (long i = i0; i < i1; i++) {
    int b = (int)(i / Hkv), qa = a->blocks[b];
    int end = a->seg_start[a->seg_of[qa] + 1], qn = end - qa < a->qb ? end - qa : a->qb;
    attend_block(a, qa, qn, (int)(i % Hkv));
  }
}

typedef struct {
  const float* gu;  // (B, 2 * inter): [gate | up]
  float* act;       // (B, inter)
  int inter, kind;
} act_args;

static void act_rows(const void* p, long r0, long r1) {
  const act_args* a = (const act_args*)p;
  for (long r = r0; r < r1; r++) {
    const float* gate = a->gu + r * 2 * a->inter;
    const float* up = gate + a->inter;
    float* o = a->act + r * a->inter;
    int i = 0;
    if (a->kind == 0)
      for (; i + 8 <= a->inter; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(gelu_tanh256(_mm256_loadu_ps(gate + i)),
                                              _mm256_loadu_ps(up + i)));
    for (; i < a->inter; i++) {
      float x = gate[i], gx;
      if (a->kind == 0) {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        gx = 0.5f * x * (1.0f + tanhf(u));
      } else {
        gx = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
      }
      o[i] = gx * up[i];
    }
  }
}

// Seconds spent per phase of geode_run since the last geode_decode_profile call:
// 0 embedding + RoPE tables, 1 norms / QK-norm / RoPE / cache writes / residuals, 2 q/k/v,
// 3 attention, 4 o, 5 gate/up, 6 activation, 7 down, 8 head + soft-cap.
#define NPHASE 9
static double phase_s[NPHASE];
static _Atomic int phase_calls;

// Copy the per-phase seconds into out[0..NPHASE) and the number of times the thread pool went
// solo (a helper preempted) into out[NPHASE], then reset them; returns the step count.
int geode_decode_profile(double* out) {
  for (int i = 0; i < NPHASE; i++) out[i] = phase_s[i], phase_s[i] = 0;
  out[NPHASE] = atomic_exchange(&pool_solo_count, 0);
  return atomic_exchange(&phase_calls, 0);
}

#define PHASE(i)                   \
  do {                             \
    double t_ = now_s();           \
    phase_s[i] += t_ - t_phase;    \
    t_phase = t_;                  \
  } while (0)

// Per-token work of a run, in chunks of tokens over the thread pool.
typedef struct {
  const geode_model* m;
  const geode_layer* L;
  const step_work* w;
  const int64_t* ids;
  const int64_t* pos;
  int stage;  // 0 embedding + RoPE tables, 1 input norm, 2 QK-norm + RoPE, 3 after attention,
              // 4 after the MLP
} tok_args;

static void tok_items(const void* p, long t0, long t1) {
  const tok_args* a = (const tok_args*)p;
  const geode_model* m = a->m;
  const geode_layer* L = a->L;
  const step_work* w = a->w;
  const int h = m->hidden, D = m->head_dim, H = m->heads, Hkv = m->kv_heads, fk = m->float_kind;
  const long nqkv = (long)(H + 2 * Hkv) * D;
  for (long t = t0; t < t1; t++) {
    float* x = w->x + t * h;
    float* xn = w->xn + t * h;
    switch (a->stage) {
      case 0:  // embedding lookup, scaled as the model does (then rounded for a bf16 model)
        for (int k = 0; k < h; k++) {
          float e = load_w1(m->embed, fk, a->ids[t] * h + k) * m->embed_scale;
          x[k] = m->embed_round ? bf16_to_f32(f32_to_bf16(e)) : e;
        }
        for (int kind = 0; kind < 2; kind++) {  // [local cos | sin | global cos | sin]
          float* cs = w->rope + t * 2 * D + kind * D;
          for (int i = 0; i < D / 2; i++) {
            float f = (float)a->pos[t] * m->inv_freq[kind][i];
            cs[i] = cosf(f);
            cs[D / 2 + i] = sinf(f);
          }
        }
        break;
      case 1:
        norm_row(x, h, L->norm[0], fk, m->eps, xn, 0);
        break;
      case 2: {  // q and k: QK-norm then RoPE; k and v rounded as the cache will store them
        float* qkv = w->qkv + t * nqkv;
        const float* cs = w->rope + t * 2 * D + (L->window ? 0 : 1) * D;
        for (int hd = 0; hd < H; hd++)
          norm_rope_head(qkv + (long)hd * D, D, L->q_norm, fk, m->eps, cs,
                         w->q + (t * H + hd) * D);
        for (int g = 0; g < Hkv; g++) {
          float* kr = w->knew + (t * Hkv + g) * D;
          norm_rope_head(qkv + (long)(H + g) * D, D, L->k_norm, fk, m->eps, cs, kr);
          if (m->cache_kind) {
            float* v = qkv + (long)(H + Hkv + g) * D;
            for (int d = 0; d < D; d++)
              kr[d] = bf16_to_f32(f32_to_bf16(kr[d])), v[d] = bf16_to_f32(f32_to_bf16(v[d]));
          }
        }
        break;
      }
      case 3:
        norm_row(w->tmp + t * h, h, L->norm[1], fk, m->eps, x, 1);
        norm_row(x, h, L->norm[2], fk, m->eps, xn, 0);
        break;
      default:
        norm_row(w->tmp + t * h, h, L->norm[3], fk, m->eps, x, 1);
    }
  }
}

static void tok_run(tok_args* a, int stage, int N, int nthreads) {
  a->stage = stage;
  long chunk = N / (4L * (nthreads > 0 ? nthreads : 1));
  if (chunk < 8) chunk = 8;
  pool_run(tok_items, a, N, chunk, N >= 32 ? nthreads : 1);
}

// Store one layer's new keys/values of a run: every token of a global layer (slot p), the last
// `slots` tokens of each segment on a local layer (ring slot p mod slots).
static void cache_write(const geode_model* m, const geode_layer* L, const attn_args* a, int nseg) {
  const int D = m->head_dim, H = m->heads, Hkv = m->kv_heads;
  for (int sg = 0; sg < nseg; sg++) {
    int s0 = a->seg_start[sg], s1 = a->seg_start[sg + 1];
    if (L->window && s1 - s0 > L->slots) s0 = s1 - L->slots;
    for (int t = s0; t < s1; t++) {
      long row = a->rows[t], p = a->pos[t], slot = L->window ? p % L->slots : p;
      for (int g = 0; g < Hkv; g++) {
        const float* k = a->knew + ((long)t * Hkv + g) * D;
        const float* v = a->qkv + (long)t * a->nqkv + (long)(H + Hkv + g) * D;
        long off = ((row * Hkv + g) * (long)L->slots + slot) * D;
        if (m->cache_kind) {
          uint16_t *kc = (uint16_t*)L->k_cache + off, *vc = (uint16_t*)L->v_cache + off;
          for (int d = 0; d < D; d++) kc[d] = f32_to_bf16(k[d]), vc[d] = f32_to_bf16(v[d]);
        } else {
          memcpy((float*)L->k_cache + off, k, sizeof(float) * D);
          memcpy((float*)L->v_cache + off, v, sizeof(float) * D);
        }
      }
    }
  }
}

// Run N flattened tokens through the decoder: token t goes to cache row rows[t] at position
// pos[t]. A row's tokens are consecutive in the list with consecutive positions (a segment),
// continuing what the row holds; rows appear in one segment each. Decode rows (one token) and
// prefill chunks (any length, longer than the ring too) mix in one call. Per layer: the GEMMs
// run over all N tokens, each token attends to its row's cached positions before the segment
// and to the segment's new keys up to its own position, then the new keys/values are stored.
// logits (nwant, vocab) for the tokens want[0 .. nwant). work: geode_run_workspace(m, N)
// floats. Returns 0, or < 0 on bad input (-1 .. -3: nothing written to the cache).
int geode_run(const geode_model* m, int N, const int32_t* rows, const int64_t* ids,
              const int64_t* pos, int nwant, const int32_t* want, float* logits, float* work,
              int nthreads) {
  const int h = m->hidden, D = m->head_dim, H = m->heads, Hkv = m->kv_heads;
  if (N < 1 || nwant < 0 || nwant > N) return -1;
  if (D > 256 || D % 2 || H % Hkv || (H / Hkv) > ATT_MAX_Q || (long)(H / Hkv) * D > ATT_MAX_ACC)
    return -2;
  for (int t = 0; t < N; t++)
    if (rows[t] < 0 || rows[t] >= m->rows || ids[t] < 0 || ids[t] >= m->vocab || pos[t] < 0 ||
        pos[t] >= m->capacity)
      return -3;
  for (int i = 0; i < nwant; i++)
    if (want[i] < 0 || want[i] >= N) return -3;
  int* seg_of = (int*)malloc(sizeof(int) * (3L * N + 1) + m->rows);
  if (!seg_of) return -5;
  int *seg_start = seg_of + N, *blocks = seg_start + N + 1;
  char* seen = (char*)(blocks + N);
  memset(seen, 0, m->rows);
  const int G = H / Hkv;
  int qb = ATT_MAX_Q / G, qcap = ATT_MAX_ACC / (G * D);
  if (qb > qcap) qb = qcap;
  if (qb < 1) qb = 1;
  int nseg = 0, nblocks = 0;
  for (int t = 0; t < N; t++) {
    if (t == 0 || rows[t] != rows[t - 1]) {
      if (seen[rows[t]]) {  // a row in two segments
        free(seg_of);
        return -3;
      }
      seen[rows[t]] = 1;
      seg_start[nseg++] = t;
    } else if (pos[t] != pos[t - 1] + 1) {  // positions of a row must be consecutive
      free(seg_of);
      return -3;
    }
    seg_of[t] = nseg - 1;
    if (t == seg_start[nseg - 1] || t - blocks[nblocks - 1] >= qb) blocks[nblocks++] = t;
  }
  seg_start[nseg] = N;
  step_work w;
  work_layout(m, N, work, &w);
  double t_phase = now_s();
  const long nqkv = (long)(H + 2 * Hkv) * D;
  tok_args ta = {m, 0, &w, ids, pos, 0};
  tok_run(&ta, 0, N, nthreads);
  PHASE(0);

  int rc = 0;
  for (int li = 0; li < m->n_layers; li++) {
    const geode_layer* L = &m->layer[li];
    ta.L = L;
    tok_run(&ta, 1, N, nthreads);
    PHASE(1);
    rc |= linear_run(&L->qkv, N, w.xn, w.qkv, (int)nqkv, nthreads);  // (N, (H + 2 Hkv) D)
    PHASE(2);
    tok_run(&ta, 2, N, nthreads);
    PHASE(1);
    attn_args aa = {m, L, rows, pos, seg_of, seg_start, blocks, nblocks, qb, nqkv,
                    w.q, w.knew, w.qkv, w.att};
    pool_run(attn_items, &aa, (long)nblocks * Hkv, 1, nthreads);  // (N, H D)
    cache_write(m, L, &aa, nseg);
    PHASE(3);
    rc |= linear_run(&L->o, N, w.att, w.tmp, h, nthreads);
    PHASE(4);
    tok_run(&ta, 3, N, nthreads);
    PHASE(1);
    rc |= linear_run(&L->gate_up, N, w.xn, w.gu, 2 * m->inter, nthreads);  // (N, 2 inter)
    PHASE(5);
    act_args ac = {w.gu, w.act, m->inter, m->act};
    long chunk = N / (4L * (nthreads > 0 ? nthreads : 1));
    pool_run(act_rows, &ac, N, chunk > 1 ? chunk : 1,
             (long)N * m->inter >= 16384 ? nthreads : 1);
    PHASE(6);
    rc |= linear_run(&L->down, N, w.act, w.tmp, h, nthreads);
    PHASE(7);
    tok_run(&ta, 4, N, nthreads);
    PHASE(1);
  }
  // slot positions (shared by all layers of a kind), written once every layer has attended
  for (int sg = 0; sg < nseg; sg++) {
    int s0 = seg_start[sg], s1 = seg_start[sg + 1];
    long row = rows[s0];
    for (int t = s0; t < s1; t++) m->pos_table[1][row * m->capacity + pos[t]] = pos[t];
    for (int t = s1 - m->ring > s0 ? s1 - m->ring : s0; t < s1; t++)
      m->pos_table[0][row * m->ring + pos[t] % m->ring] = pos[t];
  }
  free(seg_of);
  for (int i = 0; i < nwant; i++)
    norm_row(w.x + (long)want[i] * h, h, m->final_norm, m->float_kind, m->eps,
             w.xw + (long)i * h, 0);
  PHASE(1);
  if (nwant) {
    rc |= linear_run(&m->head, nwant, w.xw, logits, m->vocab, nthreads);
    if (m->final_softcap > 0) softcap_inplace(logits, (long)nwant * m->vocab, m->final_softcap);
  }
  PHASE(8);
  atomic_fetch_add(&phase_calls, 1);
  return rc ? -4 : 0;
}

// ---------------------------------------------------------------- greedy sampling
// out[r] = index of the largest x[r, :] (the first one on ties; the first NaN if any, as
// torch.argmax), for `rows` rows of n floats (row stride ldx).
void geode_argmax(int rows, long n, const float* x, long ldx, int64_t* out) {
  for (int r = 0; r < rows; r++) {
    const float* v = x + (long)r * ldx;
    __m256 mx = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= n; k += 8) {
      __m256 a = _mm256_loadu_ps(v + k);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      mx = _mm256_max_ps(mx, a);
    }
    float best = -INFINITY;
    float lanes[8];
    _mm256_storeu_ps(lanes, mx);
    for (int i = 0; i < 8; i++) best = lanes[i] > best ? lanes[i] : best;
    int has_nan = _mm256_movemask_ps(nan) != 0;
    for (; k < n; k++) {
      if (v[k] != v[k]) has_nan = 1;
      else if (v[k] > best) best = v[k];
    }
    long idx = 0;
    if (has_nan) {
      while (v[idx] == v[idx]) idx++;
    } else {
      __m256 bv = _mm256_set1_ps(best);
      for (k = 0; k + 8 <= n; k += 8) {
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + k), bv, _CMP_EQ_OQ));
        if (mask) break;
      }
      for (idx = k; idx < n && v[idx] != best; idx++) {
      }
    }
    out[r] = idx;
  }
}
