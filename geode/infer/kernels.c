// geode CPU decode kernels: y = x W^T for few rows of x (decode batches), weights in the Hugging
// Face (out, in) row-major layout, float32 activations, AVX2 + FMA, OpenMP over output rows.
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
#include <stdint.h>
#include <math.h>
#include <string.h>

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
// One output row n against MB x rows (MB <= 4), K % 8 handled by a scalar tail.
#define DEFINE_ROW_KERNEL(NAME, WT, LOADV, LOADS)                                               \
  static void NAME(int K, const WT* w, const float* x, int ldx, int MB, float* out) {          \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;                                                  \
    int k = 0;                                                                                  \
    if (MB == 1) {                                                                              \
      for (; k + 16 <= K; k += 16) {                                                            \
        a0 = _mm256_fmadd_ps(LOADV(w + k), _mm256_loadu_ps(x + k), a0);                         \
        b0 = _mm256_fmadd_ps(LOADV(w + k + 8), _mm256_loadu_ps(x + k + 8), b0);                 \
      }                                                                                         \
    } else {                                                                                    \
      for (; k + 16 <= K; k += 16) {                                                            \
        __m256 w0 = LOADV(w + k), w1 = LOADV(w + k + 8);                                        \
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);                                   \
        b0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), b0);                               \
        if (MB > 1) {                                                                           \
          a1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + ldx + k), a1);                           \
          b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + ldx + k + 8), b1);                       \
        }                                                                                       \
        if (MB > 2) {                                                                           \
          a2 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + 2 * ldx + k), a2);                       \
          b2 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 2 * ldx + k + 8), b2);                   \
        }                                                                                       \
        if (MB > 3) {                                                                           \
          a3 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + 3 * ldx + k), a3);                       \
          b3 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 3 * ldx + k + 8), b3);                   \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
    float s[4] = {hsum(_mm256_add_ps(a0, b0)), hsum(_mm256_add_ps(a1, b1)),                     \
                  hsum(_mm256_add_ps(a2, b2)), hsum(_mm256_add_ps(a3, b3))};                    \
    for (; k < K; k++) {                                                                        \
      float wk = LOADS(w[k]);                                                                   \
      for (int m = 0; m < MB; m++) s[m] += wk * x[m * ldx + k];                                 \
    }                                                                                           \
    for (int m = 0; m < MB; m++) out[m] = s[m];                                                 \
  }

#define ID(v) (v)
#define F32V(p) _mm256_loadu_ps(p)
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

// ---------------------------------------------------------------- drivers
// Several weights (nw <= MAXW) share x (M, K); weight i writes columns [off_i, off_i + N[i]) of
// y (M, ldy), off_i = N[0] + ... + N[i-1].
// kind: 0 f32, 1 bf16, 2 i8 (aux[i] = float scales (N)), 3 i4 (aux[i] = f16 scales, aux2[i] =
// f16 mins, both (N, K/G); G = group).
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
  float xs_stack[64 * 256];  // int4: per-group sums of x, (M, K/G)
  float* xs = xs_stack;
  if (kind == 3) {
    if (K % G || G % 32 || M * ngroups > 64 * 256) return -2;
    for (int m = 0; m < M; m++)
      for (int g = 0; g < ngroups; g++) {
        float s = 0;
        for (int j = 0; j < G; j++) s += x[(long)m * K + g * G + j];
        xs[m * ngroups + g] = s;
      }
  }
  if (total < 64) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (long r = 0; r < total; r++) {
    int i = 0;
    while (r >= start[i + 1]) i++;
    long n = r - start[i];
    float out[4];
    for (int m0 = 0; m0 < M; m0 += 4) {
      int MB = M - m0 < 4 ? M - m0 : 4;
      const float* xm = x + (long)m0 * K;
      switch (kind) {
        case 0:
          row_f32(K, (const float*)W[i] + n * K, xm, K, MB, out);
          break;
        case 1:
          row_bf16(K, (const uint16_t*)W[i] + n * K, xm, K, MB, out);
          break;
        case 2: {
          row_i8(K, (const int8_t*)W[i] + n * K, xm, K, MB, out);
          float s = ((const float*)aux[i])[n];
          for (int m = 0; m < MB; m++) out[m] *= s;
          break;
        }
        default:
          row_i4(K, G, (const uint8_t*)W[i] + n * (K / 2),
                 (const uint16_t*)aux[i] + n * ngroups, (const uint16_t*)aux2[i] + n * ngroups,
                 xm, K, xs + m0 * ngroups, ngroups, MB, out);
      }
      for (int m = 0; m < MB; m++) y[(long)(m0 + m) * ldy + r] = out[m];
    }
  }
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
