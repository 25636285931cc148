// Low-bit weight x int8 activation matmuls for CPUs: y[M, N] = x[M, K] @ W[N, K]'.
//
// Weights are read packed, once per step, and multiplied in integer dot products, as llama.cpp
// does: activations are quantized per row in blocks of 32 (int8 codes, a float scale), each
// block's integer dot product is scaled by weight scale x activation scale and summed in float.
//   q4: 4-bit codes in groups of 32, w = d * q + m (GGUF Q4_1 / Q4_0 / Q4_K sub-blocks);
//   q8: signed 8-bit codes in groups of 32, w = d * q (GGUF Q8_0; per-channel int8 repeats d).
// Output rows are interleaved in groups of 8 (rows padded to a multiple of 8), so that one
// 256-bit register holds 4 codes of each of 8 rows and one integer dot instruction against 4
// broadcast activations advances 8 rows at once, with no horizontal sums:
//   q4 bytes [N / 8, K / 32, 4 steps s, 8 rows, 4]: element 4s + j in the low nibble and
//      element 16 + 4s + j in the high one; scales [N / 8, K / 32, 2, 8] (d of the 8 rows, then m);
//   q8 bytes [N / 8, K / 32, 8 steps s, 8 rows, 4]: element 4s + j as code + 128;
//      scales [N / 8, K / 32, 8]. Scales are float16 or float32.
// With two activation terms (below) a block's two integer dots are joined in integer, 256 x the
// first plus the second, and scaled once.
// One arithmetic per output value, whatever M, N or the thread split: a row's result is the same
// bits in a batch of 1 or 64 (batch invariance). The AVX512-VNNI, AVX2 and portable paths, and
// AVX512-VNNI's wide loop for many rows (two groups per 512-bit register), compute the same integer
// block sums and the same float operations in the same order, so they agree bit for bit. The path
// is picked at run time from the CPU's features (set_isa overrides it, to test a CPU without them).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "lowbit.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TM_X86 1
#endif

namespace {

constexpr int64_t QK = 32;  // values per block

enum class Isa { scalar, avx2, avx512vnni };

Isa detect_isa() {
#ifdef TM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx512vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx2;
#endif
  return Isa::scalar;
}

const Isa best_isa = detect_isa();
Isa current_isa = best_isa;

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512vnni: return "avx512vnni";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

inline float to_f32(float v) { return v; }
inline float to_f32(c10::Half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }

// ---- activations: per row, per block of 32, codes q = round(x * 127 / amax), scale amax / 127 ----

// T terms per block: x ~ d1 q1 + d2 q2, q2 quantizing what q1 leaves at d2 = d1 / 256 (T = 2 gives
// about 15-bit activations for one more integer dot per block; T = 1 is llama.cpp's Q8 activations).
// Since d2 is d1 / 256 exactly, a block's two integer dots join as 256 dot1 + dot2, which a float
// holds exactly for 4-bit weights (|256 dot1 + dot2| < 2^24), and are scaled once, by d2.
// For the wide loop (many rows) the codes of 4 rows are interleaved block by block, and what it
// reads of their scales beside them, so that it reads one tile with constant offsets.
struct Activations {
  int T = 2;
  std::vector<int8_t> q;     // [M, T, K], or for the wide loop [M / 4, K / 32, 4 rows, T, 32] (M rounded up to 4)
  std::vector<float> d;      // [M, T, K / 32]
  std::vector<int32_t> sum;  // [M, T, K / 32]: sum(q)
  std::vector<float> s;      // [M, K / 32]: sum over terms of d * sum(q), for the weights' m term
  std::vector<float> quad_f;      // quads: [M / 4, K / 32, 2, 4]: each row's last-term d, then its s
  std::vector<int32_t> quad_fix;  // quads: [M / 4, K / 32, 4]: 128 x the joined sum(q), for q8's offset
};

int activation_terms = 2;

// One row's blocks, portable: per block and term, amax, codes, their sum, and the residual left
// for the next term. The vector paths below do the same float operations in the same order.
// Block b's term t codes go to q + t * ts + b * bs.
void quantize_row_scalar(const float* x, int64_t K, int T, int8_t* q, int64_t ts, int64_t bs, float* d, int32_t* sum,
                         float* s) {
  const int64_t nb = K / QK;
  float r[QK];
  for (int64_t b = 0; b < nb; ++b) {
    std::memcpy(r, x + b * QK, sizeof(r));
    float acc = 0.f, amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::fmax(amax, std::fabs(r[i]));
    float inv = amax > 0.f ? 127.f / amax : 0.f, scale = amax / 127.f;
    for (int t = 0; t < T; ++t) {
      if (t) inv *= 256.f, scale /= 256.f;
      int8_t* qb = q + t * ts + b * bs;
      int32_t total = 0;
      for (int i = 0; i < QK; ++i) {
        const float v = std::fmin(std::fmax(tokenmill::round_even(r[i] * inv), -127.f), 127.f);
        qb[i] = static_cast<int8_t>(v);
        total += static_cast<int32_t>(v);
        r[i] -= scale * v;
      }
      d[t * nb + b] = scale;
      sum[t * nb + b] = total;
      acc = std::fma(scale, static_cast<float>(total), acc);
    }
    s[b] = acc;
  }
}

#ifdef TM_X86
#define TM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TM_TARGET_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

TM_TARGET_AVX2 inline float hmax8(__m256 v) {
  v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
  return _mm_cvtss_f32(_mm256_castps256_ps128(_mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0xB1))));
}

TM_TARGET_AVX2 inline int32_t hsum8(__m256i v) {
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
}

// AVX2 (also run by the AVX512-VNNI path): a block as four 8-float registers.
TM_TARGET_AVX2 void quantize_row_avx2(const float* x, int64_t K, int T, int8_t* q, int64_t ts, int64_t bs, float* d,
                                      int32_t* sum, float* s) {
  const int64_t nb = K / QK;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleaving
  for (int64_t b = 0; b < nb; ++b) {
    __m256 r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm256_loadu_ps(x + b * QK + 8 * i);
    const __m256 m01 = _mm256_max_ps(_mm256_and_ps(r[0], absmask), _mm256_and_ps(r[1], absmask));
    const __m256 m23 = _mm256_max_ps(_mm256_and_ps(r[2], absmask), _mm256_and_ps(r[3], absmask));
    const float amax = hmax8(_mm256_max_ps(m01, m23));
    float acc = 0.f, inv = amax > 0.f ? 127.f / amax : 0.f, scale = amax / 127.f;
    for (int t = 0; t < T; ++t) {
      if (t) inv *= 256.f, scale /= 256.f;
      __m256 v[4];
      __m256i iv[4];
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_round_ps(_mm256_mul_ps(r[i], _mm256_set1_ps(inv)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v[i] = _mm256_min_ps(_mm256_max_ps(v[i], _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
        iv[i] = _mm256_cvtps_epi32(v[i]);
        r[i] = _mm256_sub_ps(r[i], _mm256_mul_ps(_mm256_set1_ps(scale), v[i]));
      }
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + t * ts + b * bs), _mm256_permutevar8x32_epi32(bytes, order));
      const int32_t total = hsum8(_mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3])));
      d[t * nb + b] = scale;
      sum[t * nb + b] = total;
      acc = std::fma(scale, static_cast<float>(total), acc);
    }
    s[b] = acc;
  }
}

// AVX512 (the VNNI path): a block as two 16-float registers; the same float operations as above.
TM_TARGET_VNNI void quantize_row_avx512(const float* x, int64_t K, int T, int8_t* q, int64_t ts, int64_t bs, float* d,
                                        int32_t* sum, float* s) {
  const int64_t nb = K / QK;
  for (int64_t b = 0; b < nb; ++b) {
    __m512 r0 = _mm512_loadu_ps(x + b * QK), r1 = _mm512_loadu_ps(x + b * QK + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(r0), _mm512_abs_ps(r1)));
    float acc = 0.f, inv = amax > 0.f ? 127.f / amax : 0.f, scale = amax / 127.f;
    const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (int t = 0; t < T; ++t) {
      if (t) inv *= 256.f, scale /= 256.f;
      const __m512 v0 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(r0, _mm512_set1_ps(inv)),
                                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
      const __m512 v1 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(r1, _mm512_set1_ps(inv)),
                                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
      const __m512i i0 = _mm512_cvtps_epi32(v0), i1 = _mm512_cvtps_epi32(v1);
      r0 = _mm512_sub_ps(r0, _mm512_mul_ps(_mm512_set1_ps(scale), v0));
      r1 = _mm512_sub_ps(r1, _mm512_mul_ps(_mm512_set1_ps(scale), v1));
      int8_t* qb = q + t * ts + b * bs;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(i0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(i1));
      const int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
      d[t * nb + b] = scale;
      sum[t * nb + b] = total;
      acc = std::fma(scale, static_cast<float>(total), acc);
    }
    s[b] = acc;
  }
}
#endif

// Quantizes the M rows of x; `quads` lays them out for the wide loop (rows past M, up to a multiple
// of 4, are zero).
void quantize_rows(const float* x, int64_t M, int64_t K, Activations& a, Isa isa, bool quads) {
  const int64_t nb = K / QK, padded = quads ? (M + 3) / 4 * 4 : M;
  const int T = a.T = activation_terms;
  a.q.resize(padded * T * K);
  a.d.resize(M * T * nb);
  a.sum.resize(M * T * nb);
  a.s.resize(M * nb);
  if (quads) {
    a.quad_f.resize(padded / 4 * nb * 8);  // every valid row's entries are written below; a pad row's codes are zero
    a.quad_fix.resize(padded / 4 * nb * 4);
    if (padded > M) std::memset(a.q.data() + M / 4 * 4 * T * K, 0, 4 * T * K);
  }
  // where row m's codes start, and the strides of its terms and blocks
  const int64_t ts = quads ? QK : K, bs = quads ? 4 * T * QK : QK;
  auto row_codes = [&](int64_t m) {
    return quads ? a.q.data() + (m / 4) * nb * 4 * T * QK + (m % 4) * T * QK : a.q.data() + m * T * K;
  };
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* q = row_codes(m);
      float* d = a.d.data() + m * T * nb;
      int32_t* sum = a.sum.data() + m * T * nb;
      float* s = a.s.data() + m * nb;
#ifdef TM_X86
      if (isa == Isa::avx512vnni) quantize_row_avx512(x + m * K, K, T, q, ts, bs, d, sum, s);
      else if (isa == Isa::avx2) quantize_row_avx2(x + m * K, K, T, q, ts, bs, d, sum, s);
      else
#endif
        quantize_row_scalar(x + m * K, K, T, q, ts, bs, d, sum, s);
      if (!quads) continue;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t tile = (m / 4) * nb + b, r = m % 4;
        a.quad_f[tile * 8 + r] = d[(T - 1) * nb + b];
        a.quad_f[tile * 8 + 4 + r] = s[b];
        a.quad_fix[tile * 4 + r] = 128 * (T == 2 ? 256 * sum[b] + sum[nb + b] : sum[b]);
      }
    }
  });
}

// ---- portable path: the same integer block dot products and float operations as the vector paths ----

template <bool Q4, typename S>
void group_scalar(const uint8_t* wg, const S* sg, int64_t nb, const Activations& a, int64_t K, int64_t m,
                  float* y, int64_t nvalid) {
  for (int64_t r = 0; r < nvalid; ++r) {
    float acc = 0.f, macc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const float d = to_f32(sg[b * (Q4 ? 16 : 8) + r]);
      int32_t joined = 0;
      for (int t = 0; t < a.T; ++t) {
        const int8_t* x = a.q.data() + (m * a.T + t) * K + b * QK;
        int32_t dot = 0;
        if (Q4) {
          const uint8_t* wb = wg + b * 128;
          for (int s = 0; s < 4; ++s)
            for (int j = 0; j < 4; ++j) {
              const uint8_t v = wb[s * 32 + r * 4 + j];
              dot += (v & 0x0F) * x[4 * s + j] + (v >> 4) * x[16 + 4 * s + j];
            }
        } else {
          const uint8_t* wb = wg + b * 256;
          for (int s = 0; s < 8; ++s)
            for (int j = 0; j < 4; ++j) dot += (static_cast<int32_t>(wb[s * 32 + r * 4 + j]) - 128) * x[4 * s + j];
        }
        joined = joined * 256 + dot;
      }
      acc = std::fma(static_cast<float>(joined), d * a.d[(m * a.T + a.T - 1) * nb + b], acc);
      if (Q4) macc = std::fma(to_f32(sg[b * 16 + 8 + r]), a.s[m * nb + b], macc);
    }
    y[r] = Q4 ? acc + macc : acc;
  }
}

#ifdef TM_X86

TM_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TM_TARGET_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
TM_TARGET_AVX2 inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// acc + per-lane sums of 4 adjacent products u[i] * x[i]: u unsigned codes, x the 4 signed
// activations at p, the same in every lane.
TM_TARGET_AVX2 inline __m256i q4dot_avx2(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
TM_TARGET_AVX2 inline __m256i q4dot_avx2(__m256i acc, __m256i u, const int8_t* p) { return q4dot_avx2(acc, u, bcast4(p)); }
// VNNI: the broadcast folded into the instruction's memory operand (the compiler issues a separate one).
TM_TARGET_VNNI inline __m256i q4dot_vnni(__m256i acc, __m256i u, const int8_t* p) {
  __asm__("vpdpbusd %[m]%{1to8%}, %[u], %[acc]" : [acc] "+v"(acc) : [u] "v"(u), [m] "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}
// q8 codes are stored offset by 128 (unsigned). AVX2: |w| x sign(x, w) keeps maddubs from saturating.
TM_TARGET_AVX2 inline __m256i q8dot_avx2(__m256i acc, __m256i u, const int8_t* p) {
  const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
  return q4dot_avx2(acc, _mm256_abs_epi8(w), _mm256_sign_epi8(bcast4(p), w));
}
TM_TARGET_AVX2 inline __m256i q8fix_avx2(__m256i acc, int32_t) { return acc; }
// VNNI: (w + 128) . x, then minus 128 * sum(x) once per block.
TM_TARGET_VNNI inline __m256i q8dot_vnni(__m256i acc, __m256i u, const int8_t* p) { return q4dot_vnni(acc, u, p); }
TM_TARGET_VNNI inline __m256i q8fix_vnni(__m256i acc, int32_t xsum) {
  return _mm256_sub_epi32(acc, _mm256_set1_epi32(128 * xsum));
}

// AVX2's q4 dot is three instructions (maddubs, madd, add); its 16-bit pair sums can instead be added
// up over a whole block (8 of them, at most 8 x 2 x 15 x 127 = 30480: no overflow) and widened once,
// which leaves about half the multiply-port work. The integer block sum is the same.
TM_TARGET_AVX2 inline __m256i q4pairs_avx2(__m256i acc16, __m256i u, __m256i s) {
  return _mm256_add_epi16(acc16, _mm256_maddubs_epi16(u, s));
}

// 8 output rows (one interleaved group) x MR activation rows; each (row, activation row) pair has
// its own accumulators and sees the one-pair arithmetic, so MR changes no bit of the result.
// SUM16: q4 blocks summed in 16 bits (AVX2), else in C chains of 32-bit dots (VNNI).
#define TM_DEFINE_GROUP(NAME, TARGET, Q4DOT, Q8DOT, Q8FIX, SUM16)                                              \
  template <bool Q4, typename S, int MR, int T>                                                                \
  TARGET void NAME(const uint8_t* wg, const S* sg, int64_t nb, const Activations& a, int64_t K, int64_t m0,   \
                   float* y, int64_t ldy, int64_t nvalid) {                                                    \
    const __m256i low = _mm256_set1_epi8(0x0F);                                                                \
    __m256 acc[MR], macc[MR];                                                                                  \
    for (int r = 0; r < MR; ++r) acc[r] = macc[r] = _mm256_setzero_ps();                                       \
    /* C independent integer chains per (row, term), summed at the end: an integer sum in any order */       \
    /* gives the same bits, and short chains hide the dot instructions' latency (MR rows bring their own). */ \
    constexpr int C = (MR >= 4 || (Q4 && SUM16)) ? 1 : 4 / MR;                                                 \
    for (int64_t b = 0; b < nb; ++b) {                                                                         \
      __m256i dot[MR][T], chain[C][MR][T];                                                                     \
      const int8_t* x[MR][T];                                                                                  \
      for (int r = 0; r < MR; ++r)                                                                             \
        for (int t = 0; t < T; ++t) {                                                                          \
          for (int c = 0; c < C; ++c) chain[c][r][t] = _mm256_setzero_si256();                                \
          x[r][t] = a.q.data() + ((m0 + r) * T + t) * K + b * QK;                                              \
        }                                                                                                      \
      if (Q4 && SUM16) {                                                                                       \
        const uint8_t* wb = wg + b * 128;                                                                      \
        __m256i pairs[MR][T];                                                                                  \
        for (int r = 0; r < MR; ++r)                                                                           \
          for (int t = 0; t < T; ++t) pairs[r][t] = _mm256_setzero_si256();                                   \
        for (int s = 0; s < 4; ++s) {                                                                          \
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 32));                \
          const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);   \
          for (int r = 0; r < MR; ++r)                                                                         \
            for (int t = 0; t < T; ++t) {                                                                      \
              pairs[r][t] = q4pairs_avx2(pairs[r][t], lo, bcast4(x[r][t] + 4 * s));                            \
              pairs[r][t] = q4pairs_avx2(pairs[r][t], hi, bcast4(x[r][t] + 16 + 4 * s));                       \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < MR; ++r)                                                                           \
          for (int t = 0; t < T; ++t) chain[0][r][t] = _mm256_madd_epi16(pairs[r][t], _mm256_set1_epi16(1));   \
      } else if (Q4) {                                                                                         \
        const uint8_t* wb = wg + b * 128;                                                                      \
        for (int s = 0; s < 4; ++s) {                                                                          \
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 32));                \
          const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);   \
          for (int r = 0; r < MR; ++r)                                                                         \
            for (int t = 0; t < T; ++t) {                                                                      \
              __m256i& c0 = chain[(2 * s) % C][r][t];                                                          \
              c0 = Q4DOT(c0, lo, x[r][t] + 4 * s);                                                            \
              __m256i& c1 = chain[(2 * s + 1) % C][r][t];                                                      \
              c1 = Q4DOT(c1, hi, x[r][t] + 16 + 4 * s);                                                       \
            }                                                                                                  \
        }                                                                                                      \
      } else {                                                                                                 \
        const uint8_t* wb = wg + b * 256;                                                                      \
        for (int s = 0; s < 8; ++s) {                                                                          \
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 32));                \
          for (int r = 0; r < MR; ++r)                                                                         \
            for (int t = 0; t < T; ++t) chain[s % C][r][t] = Q8DOT(chain[s % C][r][t], v, x[r][t] + 4 * s);  \
        }                                                                                                      \
      }                                                                                                        \
      for (int r = 0; r < MR; ++r)                                                                             \
        for (int t = 0; t < T; ++t) {                                                                          \
          dot[r][t] = chain[0][r][t];                                                                          \
          for (int c = 1; c < C; ++c) dot[r][t] = _mm256_add_epi32(dot[r][t], chain[c][r][t]);                \
          if (!Q4) dot[r][t] = Q8FIX(dot[r][t], a.sum[((m0 + r) * T + t) * nb + b]);                           \
        }                                                                                                      \
      const S* sb = sg + b * (Q4 ? 16 : 8);                                                                    \
      const __m256 d = load8(sb);                                                                              \
      for (int r = 0; r < MR; ++r) {                                                                           \
        const __m256i joined = T == 2 ? _mm256_add_epi32(_mm256_slli_epi32(dot[r][0], 8), dot[r][T - 1]) : dot[r][0]; \
        const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d[((m0 + r) * T + T - 1) * nb + b]));          \
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(joined), scale, acc[r]);                                   \
      }                                                                                                        \
      if (Q4) {                                                                                                \
        const __m256 mins = load8(sb + 8);                                                                     \
        for (int r = 0; r < MR; ++r)                                                                           \
          macc[r] = _mm256_fmadd_ps(mins, _mm256_set1_ps(a.s[(m0 + r) * nb + b]), macc[r]);                   \
      }                                                                                                        \
    }                                                                                                          \
    for (int r = 0; r < MR; ++r) {                                                                             \
      const __m256 out = Q4 ? _mm256_add_ps(acc[r], macc[r]) : acc[r];                                         \
      float* yr = y + (m0 + r) * ldy;                                                                          \
      if (nvalid == 8) {                                                                                       \
        _mm256_storeu_ps(yr, out);                                                                             \
      } else {                                                                                                 \
        alignas(32) float tmp[8];                                                                              \
        _mm256_store_ps(tmp, out);                                                                             \
        std::memcpy(yr, tmp, nvalid * sizeof(float));                                                          \
      }                                                                                                        \
    }                                                                                                          \
  }

TM_DEFINE_GROUP(group_avx2, TM_TARGET_AVX2, q4dot_avx2, q8dot_avx2, q8fix_avx2, true)
TM_DEFINE_GROUP(group_vnni, TM_TARGET_VNNI, q4dot_vnni, q8dot_vnni, q8fix_vnni, false)
#endif

#ifdef TM_X86
// AVX512-VNNI: two adjacent groups (16 output rows) in each 512-bit register, with the pointers kept
// out of the block loop. Per output value the integer block sums and the float operations, in their
// order, are group_vnni's: same bits.
TM_TARGET_VNNI inline __m512 load16(const float* a, const float* b) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(a))),
                                             _mm256_castps_pd(_mm256_loadu_ps(b)), 1));
}
TM_TARGET_VNNI inline __m512 load16(const c10::Half* a, const c10::Half* b) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}
TM_TARGET_VNNI inline __m512i load32x2(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}
// acc + dpbusd(u, the 4 bytes at p in every lane), the broadcast folded into the memory operand
TM_TARGET_VNNI inline __m512i dpbusd_bcast(__m512i acc, __m512i u, const int8_t* p) {
  __asm__("vpdpbusd %[m]%{1to16%}, %[u], %[acc]" : [acc] "+v"(acc) : [u] "v"(u), [m] "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}

// One pair of groups (or one group twice, wbytes = sstride = 0) x one quad of 4 activation rows, from
// the quads' layout: each weight load serves the 4 rows, and every activation read is at a constant
// offset from one pointer. Stores the first `lanes` outputs of each of the first `rows` rows.
template <bool Q4, typename S, int T>
TM_TARGET_VNNI void wide_vnni(const uint8_t* w, const S* sc, int64_t wbytes, int64_t sstride, int64_t nb,
                              const int8_t* xq, const float* xf, const int32_t* xfix, float* y, int64_t ldy,
                              int64_t rows, int lanes) {
  constexpr int MR = 4;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MR], macc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = macc[r] = _mm512_setzero_ps();
  constexpr int64_t WB = Q4 ? 128 : 256, SB = Q4 ? 16 : 8, XB = MR * T * QK;
  for (int64_t b = 0; b < nb; ++b, xq += XB, xf += 8, xfix += MR) {
    __m512i dot[MR][T];
    for (int r = 0; r < MR; ++r)
      for (int t = 0; t < T; ++t) dot[r][t] = _mm512_setzero_si512();
    const uint8_t* wb = w + b * WB;
    if (Q4) {
      for (int s = 0; s < 4; ++s) {
        const __m512i v = load32x2(wb + s * 32, wb + wbytes + s * 32);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < MR; ++r)
          for (int t = 0; t < T; ++t) {
            const int8_t* x = xq + (r * T + t) * QK;
            dot[r][t] = dpbusd_bcast(dot[r][t], lo, x + 4 * s);
            dot[r][t] = dpbusd_bcast(dot[r][t], hi, x + 16 + 4 * s);
          }
      }
    } else {
      for (int s = 0; s < 8; ++s) {
        const __m512i v = load32x2(wb + s * 32, wb + wbytes + s * 32);
        for (int r = 0; r < MR; ++r)
          for (int t = 0; t < T; ++t) dot[r][t] = dpbusd_bcast(dot[r][t], v, xq + (r * T + t) * QK + 4 * s);
      }
    }
    const S* sb = sc + b * SB;
    const __m512 d = load16(sb, sb + sstride);
    for (int r = 0; r < MR; ++r) {
      __m512i joined = T == 2 ? _mm512_add_epi32(_mm512_slli_epi32(dot[r][0], 8), dot[r][T - 1]) : dot[r][0];
      if (!Q4) joined = _mm512_sub_epi32(joined, _mm512_set1_epi32(xfix[r]));  // the codes' +128
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(joined), _mm512_mul_ps(d, _mm512_set1_ps(xf[r])), acc[r]);
    }
    if (Q4) {
      const __m512 mins = load16(sb + 8, sb + sstride + 8);
      for (int r = 0; r < MR; ++r) macc[r] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xf[4 + r]), macc[r]);
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << lanes) - 1);
  for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, Q4 ? _mm512_add_ps(acc[r], macc[r]) : acc[r]);
}
#endif

// Rows of activations per tile of the many-row path: a tile's codes stay in cache while a thread
// runs its groups over them.
constexpr int64_t ROW_TILE = 64;
// From this many activation rows on, AVX512-VNNI takes the wide path: about 1.15x the group path's
// multiply rate. With fewer rows the step streams weights from memory, and there group_vnni's single
// stream per thread is faster (two streams in lockstep read large matrices about 1.5x slower).
constexpr int64_t PAIR_ROWS = 16;

#ifdef TM_X86
// The wide path over a whole matrix: threads take runs of 2 whole groups, ROW_TILE rows at a time, 4
// rows (a quad) per call; the groups that do not fill a run (an odd count, a partial group) go one
// by one, each read as both halves of a pair with only its own lanes stored.
template <bool Q4, typename S, int T>
void wide_matmul(const uint8_t* w, const S* sc, int64_t wbytes, int64_t sstride, int64_t nb, const Activations& a,
                 int64_t M, int64_t N, float* y) {
  const int64_t pairs = (N / 8) / 2, groups = (N + 7) / 8, left = groups - 2 * pairs;
  auto quads = [&](const uint8_t* wi, const S* si, int64_t wstep, int64_t sstep, int64_t m0, int64_t m1, float* yi,
                   int lanes) {
    for (int64_t m = m0; m < m1; m += 4) {
      const int64_t tile = m / 4 * nb;
      wide_vnni<Q4, S, T>(wi, si, wstep, sstep, nb, a.q.data() + tile * 4 * T * QK, a.quad_f.data() + tile * 8,
                          a.quad_fix.data() + tile * 4, yi + m * N, N, std::min<int64_t>(4, M - m), lanes);
    }
  };
  at::parallel_for(0, pairs + left, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
      const int64_t m1 = std::min(M, m0 + ROW_TILE);
      for (int64_t i = i0; i < std::min(i1, pairs); ++i)
        quads(w + 2 * i * wbytes, sc + 2 * i * sstride, wbytes, sstride, m0, m1, y + 16 * i, 16);
      for (int64_t i = std::max(i0, pairs); i < i1; ++i) {
        const int64_t g = 2 * pairs + (i - pairs);
        quads(w + g * wbytes, sc + g * sstride, 0, 0, m0, m1, y + 8 * g, static_cast<int>(std::min<int64_t>(8, N - 8 * g)));
      }
    }
  });
}
#endif

// One group of 8 output rows against every activation row, MR rows at a time where the path has
// the registers for it.
template <bool Q4, typename S, int T>
void group_rows(Isa isa, const uint8_t* wg, const S* sg, int64_t nb, const Activations& a, int64_t K, int64_t M,
                float* y, int64_t ldy, int64_t nvalid) {
  int64_t m = 0;
  switch (isa) {
#ifdef TM_X86
    case Isa::avx512vnni:
      for (; m + 4 <= M; m += 4) group_vnni<Q4, S, 4, T>(wg, sg, nb, a, K, m, y, ldy, nvalid);
      for (; m < M; ++m) group_vnni<Q4, S, 1, T>(wg, sg, nb, a, K, m, y, ldy, nvalid);
      return;
    case Isa::avx2:
      for (; m + 2 <= M; m += 2) group_avx2<Q4, S, 2, T>(wg, sg, nb, a, K, m, y, ldy, nvalid);
      for (; m < M; ++m) group_avx2<Q4, S, 1, T>(wg, sg, nb, a, K, m, y, ldy, nvalid);
      return;
#endif
    default:
      for (; m < M; ++m) group_scalar<Q4, S>(wg, sg, nb, a, K, m, y + m * ldy, nvalid);
  }
}

template <bool Q4, typename S>
void matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, const S* sc, int64_t N, float* y) {
  const int64_t nb = K / QK, groups = (N + 7) / 8;
  const int64_t wbytes = nb * (Q4 ? 128 : 256), sstride = nb * (Q4 ? 16 : 8);
  const Isa isa = current_isa;
  // Reused: a decode step makes over a hundred of these calls. Bound to a local reference, which the
  // workers' lambda captures (naming the thread_local there would give each worker its own, empty).
  static thread_local Activations buffers;
  Activations& a = buffers;
  const bool wide = isa == Isa::avx512vnni && M >= PAIR_ROWS;
  quantize_rows(x, M, K, a, isa, wide);
  auto groups_at = [&](int64_t g) {
    const int64_t nvalid = std::min<int64_t>(8, N - g * 8);
    if (a.T == 2) group_rows<Q4, S, 2>(isa, w + g * wbytes, sc + g * sstride, nb, a, K, M, y + g * 8, N, nvalid);
    else group_rows<Q4, S, 1>(isa, w + g * wbytes, sc + g * sstride, nb, a, K, M, y + g * 8, N, nvalid);
  };
#ifdef TM_X86
  if (wide) {
    if (a.T == 2) wide_matmul<Q4, S, 2>(w, sc, wbytes, sstride, nb, a, M, N, y);
    else wide_matmul<Q4, S, 1>(w, sc, wbytes, sstride, nb, a, M, N, y);
    return;
  }
#endif
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) groups_at(g);
  });
}

}  // namespace

namespace tokenmill {

void lowbit_mm_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t N, bool q4,
                    at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scales.device().is_cpu(), "lowbit kernels run on CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "activations must be float32");
  TORCH_CHECK(w.scalar_type() == at::kByte, "packed weights must be uint8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf, "scales must be float32 or float16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x [M, K] and packed weights [N / 8, bytes] expected");
  const int64_t M = x.size(0), K = x.size(1), groups = (N + 7) / 8, nb = K / QK;
  TORCH_CHECK(K % QK == 0, "the input width must be a multiple of 32, got ", K);
  TORCH_CHECK(w.size(0) == groups && w.size(1) == nb * (q4 ? 128 : 256), "packed weights do not match x and N");
  TORCH_CHECK(scales.numel() == groups * nb * (q4 ? 16 : 8), "scales do not match the weights");
  TORCH_CHECK(w.is_contiguous() && scales.is_contiguous(), "packed weights and scales must be contiguous");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.numel() == M * N, "y must be float32 [M, N]");
  if (M == 0 || N == 0) return;
  const at::Tensor xc = x.contiguous();
  const auto* wp = w.const_data_ptr<uint8_t>();
  if (scales.scalar_type() == at::kHalf) {
    const auto* sp = scales.const_data_ptr<c10::Half>();
    q4 ? matmul<true>(xc.const_data_ptr<float>(), M, K, wp, sp, N, y.data_ptr<float>())
       : matmul<false>(xc.const_data_ptr<float>(), M, K, wp, sp, N, y.data_ptr<float>());
  } else {
    const auto* sp = scales.const_data_ptr<float>();
    q4 ? matmul<true>(xc.const_data_ptr<float>(), M, K, wp, sp, N, y.data_ptr<float>())
       : matmul<false>(xc.const_data_ptr<float>(), M, K, wp, sp, N, y.data_ptr<float>());
  }
}

at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t N, bool q4) {
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  lowbit_mm_into(x, w, scales, N, q4, y);
  return y;
}

}  // namespace tokenmill

namespace {

using tokenmill::lowbit_mm;

at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dm, int64_t n) {
  return lowbit_mm(x, w, dm, n, true);
}
at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d, int64_t n) {
  return lowbit_mm(x, w, d, n, false);
}

// The path in use; "best" restores the CPU's best. Returns the name of the path now in use.
std::string set_isa(const std::string& name) {
  Isa want = best_isa;
  if (name == "scalar") want = Isa::scalar;
  else if (name == "avx2") want = Isa::avx2;
  else if (name == "avx512vnni") want = Isa::avx512vnni;
  else TORCH_CHECK(name == "best", "unknown kernel path ", name);
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best_isa), "this CPU cannot run the ", name, " path");
  current_isa = want;
  return isa_name(current_isa);
}

std::string isa() { return isa_name(current_isa); }

int64_t set_activation_terms(int64_t terms) {
  TORCH_CHECK(terms == 1 || terms == 2, "activation terms must be 1 or 2");
  activation_terms = static_cast<int>(terms);
  return terms;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("q4_mm(Tensor x, Tensor w, Tensor dm, int n) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor w, Tensor d, int n) -> Tensor");
  m.def("set_isa(str name) -> str");
  m.def("isa() -> str");
  m.def("set_activation_terms(int terms) -> int");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("q4_mm", q4_mm);
  m.impl("q8_mm", q8_mm);
}

TORCH_LIBRARY_IMPL(tokenmill, CatchAll, m) {
  m.impl("set_isa", set_isa);
  m.impl("isa", isa);
  m.impl("set_activation_terms", set_activation_terms);
}
