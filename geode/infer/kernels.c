// geode CPU decode kernels: y = x W^T for few rows of x (decode batches), weights in the Hugging
// Face (out, in) row-major layout, float32 activations, AVX2 + FMA, threads over output rows.
//
// Weight formats (one call may take several weights that share the same x, e.g. q/k/v):
//   f32   W (N, K) float
//   bf16  W (N, K) bfloat16 (uint16 bits), widened to float by a 16-bit shift
//   i8    W (N, K) int8 with one float scale per output row: w = q * s[n]
//   i4    W (N, K/2) bytes, groups of G (multiple of 32) along K with float16 scale and min:
//         w = q * s + m, q in 0..15. In each block of 32 values, byte j holds value j in its low
//         nibble and value j + 16 in its high nibble.
// Decode is memory-bound: every weight byte is read once per call whatever M is (M <= 16),
// with x rows (M x K floats) kept in L1/L2.
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <math.h>
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
// One output row n against MB x rows (MB <= 4, a compile-time constant at each call site so
// the accumulators stay in registers); K % 16 handled by a scalar tail.
#define DEFINE_ROW_KERNEL(NAME, WT, LOADV, LOADS)                                               \
  static inline __attribute__((always_inline)) void NAME##_mb(                                 \
      int K, const WT* w, const float* x, int ldx, const int MB, float* out) {                 \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;                                                  \
    int k = 0;                                                                                  \
    for (; k + 16 <= K; k += 16) {                                                              \
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
DEFINE_ROW_KERNEL(row_f32, float, F32V, ID)
DEFINE_ROW_KERNEL(row_bf16, uint16_t, load_bf16, bf16_to_f32)
DEFINE_ROW_KERNEL(row_i8, int8_t, load_i8, (float))

// ---------------------------------------------------------------- int4 group-wise rows
// MB is a compile-time constant at each call site (always_inline), so the per-row partial sums
// stay in registers.
static inline __attribute__((always_inline)) void row_i4_mb(
    int K, int G, const uint8_t* w, const uint16_t* sc, const uint16_t* mn, const float* x,
    int ldx, const float* xs, int ldxs, const int MB, float* out) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  float bias[4] = {0, 0, 0, 0};
  int ngroups = K / G;
  for (int g = 0; g < ngroups; g++) {
    __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
    for (int b = 0; b < G; b += 32) {
      int k = g * G + b;
      __m128i v = _mm_loadu_si128((const __m128i*)(w + k / 2));
      __m128i lo = _mm_and_si128(v, low);
      __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
      __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
#define I4_ROW(P, M)                                                  \
  {                                                                   \
    const float* xm = x + (M) * ldx + k;                              \
    P = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xm), P);                  \
    P = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xm + 8), P);              \
    P = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xm + 16), P);             \
    P = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xm + 24), P);             \
  }
      I4_ROW(p0, 0);
      if (MB > 1) I4_ROW(p1, 1);
      if (MB > 2) I4_ROW(p2, 2);
      if (MB > 3) I4_ROW(p3, 3);
#undef I4_ROW
    }
    __m256 sv = _mm256_set1_ps(_cvtsh_ss(sc[g]));
    float m0 = _cvtsh_ss(mn[g]);
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
  out[0] = hsum(acc0) + bias[0];
  if (MB > 1) out[1] = hsum(acc1) + bias[1];
  if (MB > 2) out[2] = hsum(acc2) + bias[2];
  if (MB > 3) out[3] = hsum(acc3) + bias[3];
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

static long pool_claim(uint32_t gen, long nchunks) {
  uint64_t w = atomic_load_explicit(&pool.word, memory_order_acquire);
  for (;;) {
    if ((uint32_t)(w >> 32) != gen) return -1;
    long i = (long)(w & 0xffffffffu);
    if (i >= nchunks) return -1;
    if (atomic_compare_exchange_weak(&pool.word, &w, w + 1)) return i;
  }
}

static void pool_run_chunks(uint32_t gen, job_fn fn, const void* args, long items, long chunk,
                            long nchunks) {
  long i;
  while ((i = pool_claim(gen, nchunks)) >= 0) {
    long b = i * chunk, e = b + chunk < items ? b + chunk : items;
    fn(args, b, e);
    atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
  }
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
    pool_run_chunks(seen, fn, args, items, chunk, nchunks);
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

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// When the caller had to wait long for a helper's chunk (the helper was preempted: the machine
// is oversubscribed), jobs run on the caller alone for a while, then threads are tried again.
static double solo_until = 0;

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
  pool_run_chunks(gen, fn, args, items, chunk, nchunks);
  if (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks) {
    double t0 = now_s();
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks) _mm_pause();
    double waited = now_s() - t0;
    // Chunks take ~50 us; a 1 ms wait means the helper was preempted (OS slices are ms long).
    solo_until = waited > 1e-3 ? t0 + waited + 0.25 : 0;
  }
  pthread_mutex_unlock(&pool.busy);
}

// ---------------------------------------------------------------- drivers
// Several weights (nw <= MAXW) share x (M, K); weight i writes columns [off_i, off_i + N[i]) of
// y (M, ldy), off_i = N[0] + ... + N[i-1].
// kind: 0 f32, 1 bf16, 2 i8 (aux[i] = float scales (N)), 3 i4 (aux[i] = f16 scales, aux2[i] =
// f16 mins, both (N, K/G); G = group).
typedef struct {
  int kind, M, K, G, ngroups, ldy;
  const float* x;
  const float* xs;
  const void** W;
  const void** aux;
  const void** aux2;
  const long* start;
  float* y;
} gemv_args;

static void gemv_rows(const void* p, long r0, long r1) {
  const gemv_args* a = (const gemv_args*)p;
  const int M = a->M, K = a->K, G = a->G, ngroups = a->ngroups;
  int i = 0;
  for (long r = r0; r < r1; r++) {
    while (r >= a->start[i + 1]) i++;
    long n = r - a->start[i];
    float out[4];
    int m_done = 0;
    if (M >= 4 && a->kind < 3 && r + 1 < r1 && r + 1 < a->start[i + 1]) {
      // two rows of the same weight at a time for every full block of 4 x rows
      float o2[4];
      for (; m_done + 4 <= M; m_done += 4) {
        const float* xm = a->x + (long)m_done * K;
        if (a->kind == 0) {
          const float* w = (const float*)a->W[i] + n * K;
          row2_f32(K, w, w + K, xm, K, out, o2);
        } else if (a->kind == 1) {
          const uint16_t* w = (const uint16_t*)a->W[i] + n * K;
          row2_bf16(K, w, w + K, xm, K, out, o2);
        } else {
          const int8_t* w = (const int8_t*)a->W[i] + n * K;
          row2_i8(K, w, w + K, xm, K, out, o2);
          float s0 = ((const float*)a->aux[i])[n], s1 = ((const float*)a->aux[i])[n + 1];
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
            if (a->kind == 0) row_f32(K, (const float*)a->W[i] + nn * K, xm, K, MB, out);
            else if (a->kind == 1) row_bf16(K, (const uint16_t*)a->W[i] + nn * K, xm, K, MB, out);
            else {
              row_i8(K, (const int8_t*)a->W[i] + nn * K, xm, K, MB, out);
              for (int m = 0; m < MB; m++) out[m] *= ((const float*)a->aux[i])[nn];
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
      switch (a->kind) {
        case 0:
          row_f32(K, (const float*)a->W[i] + n * K, xm, K, MB, out);
          break;
        case 1:
          row_bf16(K, (const uint16_t*)a->W[i] + n * K, xm, K, MB, out);
          break;
        case 2: {
          row_i8(K, (const int8_t*)a->W[i] + n * K, xm, K, MB, out);
          float s = ((const float*)a->aux[i])[n];
          for (int m = 0; m < MB; m++) out[m] *= s;
          break;
        }
        default:
          row_i4(K, G, (const uint8_t*)a->W[i] + n * (K / 2),
                 (const uint16_t*)a->aux[i] + n * ngroups,
                 (const uint16_t*)a->aux2[i] + n * ngroups, xm, K, a->xs + m0 * ngroups,
                 ngroups, MB, out);
      }
      for (int m = 0; m < MB; m++) a->y[(long)(m0 + m) * a->ldy + r] = out[m];
    }
  }
}

int geode_gemv(int kind, int M, int K, const float* x, int nw, const void** W, const int* N,
               float* y, int ldy, const void** aux, const void** aux2, int G, int nthreads) {
  if (nw > MAXW || M < 1 || M > 64) return -1;
  long total = 0, start[MAXW + 1];
  for (int i = 0; i < nw; i++) {
    start[i] = total;
    total += N[i];
  }
  start[nw] = total;
  int ngroups = (kind == 3) ? K / G : 0;
  float xs[64 * 256];  // int4: per-group sums of x, (M, K/G)
  if (kind == 3) {
    if (K % G || G % 32 || M * ngroups > 64 * 256) return -2;
    for (int m = 0; m < M; m++)
      for (int g = 0; g < ngroups; g++) {
        float s = 0;
        for (int j = 0; j < G; j++) s += x[(long)m * K + g * G + j];
        xs[m * ngroups + g] = s;
      }
  }
  gemv_args a = {kind, M, K, G, ngroups, ldy, x, xs, W, aux, aux2, start, y};
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
