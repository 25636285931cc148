// The decoder layer's small operations in C++, and a model step that runs every layer in one call.
//
// Each operation works row by row: a row's result depends on that row's data alone, never on
// how many rows share the call or which thread computes it. The fused loop (step_layers) calls
// exactly these functions, so a token computed one operator at a time from Python (a float model,
// or one with q/k norms) and one computed in the fused loop get the same bits. Lane-wise loops
// below keep one accumulator per lane and combine lanes in a fixed order: the compiler may
// vectorize them at any width and no sum is reordered. Attention alone lets products and sums
// fuse into FMAs, where the CPU's clone has them: a machine always runs the same clone.
//
// Attention reads each query row's context straight from the paged cache through its block
// table: no gather, no padding. Query rows of decodes, of prefill chunks and of speculative
// verifications are alike: row r attends to positions [lens[r] - window, lens[r]).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "lowbit.h"

namespace {

constexpr int L = 16;  // lanes of the lane-wise loops

// Inlined into each target clone of its caller (else it would be built for the baseline CPU only).
#define TM_INLINE inline __attribute__((always_inline))
// Attention's products and sums may fuse into FMAs (1.3-1.8x faster) where the clone's CPU has them
// (x86-64-v3 and v4).
#define TM_FMA __attribute__((optimize("fp-contract=fast")))

#if defined(__x86_64__) && !defined(__clang__)
#define TM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TM_CLONES
#endif

// Hugging Face's half-split rotation of `heads` vectors of one token: x * cos + rotate_half(x) * sin.
TM_CLONES void rope_row(float* x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// exp(x), lane by lane (vectorizable; within 2 ulp): 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = tokenmill::round_even(x * 1.44269504f);  // |x| <= 88: exact
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// y = silu(gate) * up for one row of [gate | up].
TM_CLONES void silu_mul_row(const float* gu, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gu[i];
    y[i] = g / (1.f + fast_exp(-g)) * gu[n + i];
  }
}

// 16 float lanes as two 8-lane GCC vectors, lanes 0-7 and 8-15: each target clone keeps them in
// registers (two ymm, four xmm; a 64-byte vector type spills to the stack on AVX2) with the same
// lane arithmetic, and folds them in a fixed order.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }

inline float fold(v8 lo, v8 hi) {
  const v8 b = lo + hi;
  const v4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// Sum of a[i] * b[i] (b = a: sum of squares) over n, 16 lanes at a time; a tail is added lane 0 first.
inline float dot(const float* a, const float* b, int64_t n) {
  v8 lo = {}, hi = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    lo += load8(a + i) * load8(b + i);
    hi += load8(a + i + 8) * load8(b + i + 8);
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return fold(lo, hi) + tail;
}

inline float sum(const float* a, int64_t n) {
  v8 lo = {}, hi = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    lo += load8(a + i);
    hi += load8(a + i + 8);
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i];
  return fold(lo, hi) + tail;
}

inline void exp_shift(float* s, int64_t n, float m) {
  for (int64_t i = 0; i < n; ++i) s[i] = fast_exp(s[i] - m);
}

// sum of squares, then x * rsqrt(mean + eps) * w
TM_CLONES void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  const float inv = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t j = 0; j < n; ++j) y[j] = x[j] * inv * w[j];
}

void rms_norm_rows(const float* x, const float* w, int64_t rows, int64_t n, float eps, float* y) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(x + r * n, w, n, eps, y + r * n);
  });
}

struct Cache {
  const float* data;   // [slots, 2, kv_heads, hd]
  int64_t kv_heads, hd, block_size;
  const float* k(int64_t slot, int64_t h) const { return data + (slot * 2 * kv_heads + h) * hd; }
  const float* v(int64_t slot, int64_t h) const { return data + ((slot * 2 + 1) * kv_heads + h) * hd; }
};

// A position's K (or V) is kv_heads x head_dim floats at a stride of 2 x kv_heads x head_dim:
// too far apart for the hardware prefetcher, so each pass fetches PREFETCH positions ahead.
constexpr int64_t PREFETCH = 8;

inline void prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}

// a . b over n (a multiple of 8) in 8 lanes: lane j sums the products at j, j + 8, ...
TM_FMA TM_INLINE v8 dot_lanes(const float* a, const float* b, int64_t n) {
  v8 acc = load8(a) * load8(b);
  for (int64_t i = 8; i < n; i += 8) acc += load8(a + i) * load8(b + i);
  return acc;
}

// The sum of each of 8 lane vectors, as one vector: lanes paired (0+1, 2+3, 4+5, 6+7), then pairs
// of pairs, then halves, in the same tree for every vector (fold8 below is one column of it).
TM_FMA TM_INLINE v8 sum8(const v8* a) {
  v8 t[4], u[2];
  for (int k = 0; k < 4; ++k)
    t[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int k = 0; k < 2; ++k)
    u[k] = __builtin_shufflevector(t[2 * k], t[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(t[2 * k], t[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(u[0], u[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(u[0], u[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

TM_FMA TM_INLINE float fold8(v8 a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

// Scores of B query vectors against 8 positions' keys: each (vector, position) pair's products in 8
// lanes, head_dim in order (dot_lanes' sums), then the 8 positions at once; the B vectors share each
// key load, and a vector's scores are the same bits for any B.
template <int B>
TM_FMA TM_INLINE void score_chunk(const float* const* q, const float* const* k, int64_t hd, v8 sc, float* const* dst) {
  v8 part[B][8];
  for (int p = 0; p < 8; ++p) {
    const v8 kv = load8(k[p]);
    for (int b = 0; b < B; ++b) part[b][p] = load8(q[b]) * kv;
  }
  for (int64_t d = 8; d < hd; d += 8)
    for (int p = 0; p < 8; ++p) {
      const v8 kv = load8(k[p] + d);
      for (int b = 0; b < B; ++b) part[b][p] += load8(q[b] + d) * kv;
    }
  for (int b = 0; b < B; ++b) {
    const v8 r = sum8(part[b]) * sc;
    std::memcpy(dst[b], &r, sizeof(r));
  }
}

// The B rows of an attention call: row b's context is its first n[b] positions, whose cache slots
// are slots[b]; the first `shared` positions have the same slots in every row (a prefill chunk's
// consecutive rows, or sequences over one cached prefix).
template <int B>
struct Rows {
  const int64_t* slots[B];
  int64_t n[B];
  int64_t shared;
};

// Outputs of B rows x NH query heads of one KV head, hd / 32 chunks of 32 lanes in registers, each
// over its positions in order: the shared positions for all rows at once (each V load serves every
// row and head), then each row's own. Each (row, head)'s sums are its own, in the same order.
template <int B, int NH>
TM_FMA TM_INLINE void weigh_values(const Cache& c, const Rows<B>& rows, int64_t kv, const float* const (*s)[NH],
                                   const float (*inv)[NH], float* const (*out)[NH]) {
  for (int64_t j = 0; j + 32 <= c.hd; j += 32) {
    v8 acc[B][NH][4] = {};
    auto add = [&](int b, int64_t i, v8 v0, v8 v1, v8 v2, v8 v3) __attribute__((always_inline)) {
      for (int h = 0; h < NH; ++h) {
        const float si = s[b][h][i];
        const v8 p = {si, si, si, si, si, si, si, si};
        acc[b][h][0] += p * v0;
        acc[b][h][1] += p * v1;
        acc[b][h][2] += p * v2;
        acc[b][h][3] += p * v3;
      }
    };
    for (int64_t i = 0; i < rows.shared; ++i) {
      const float* vp = c.v(rows.slots[0][i], kv) + j;
      const v8 v0 = load8(vp), v1 = load8(vp + 8), v2 = load8(vp + 16), v3 = load8(vp + 24);
      for (int b = 0; b < B; ++b) add(b, i, v0, v1, v2, v3);
    }
    for (int b = 0; b < B; ++b)
      for (int64_t i = rows.shared; i < rows.n[b]; ++i) {
        const float* vp = c.v(rows.slots[b][i], kv) + j;
        add(b, i, load8(vp), load8(vp + 8), load8(vp + 16), load8(vp + 24));
      }
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < NH; ++h) {
        const float w = inv[b][h];
        const v8 wv = {w, w, w, w, w, w, w, w};
        for (int k = 0; k < 4; ++k) *reinterpret_cast<v8*>(out[b][h] + j + 8 * k) = acc[b][h][k] * wv;
      }
  }
  for (int64_t j = c.hd / 32 * 32; j < c.hd; ++j)  // a head_dim that is not a multiple of 32
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < NH; ++h) {
        float a = 0.f;
        for (int64_t i = 0; i < rows.n[b]; ++i) a += s[b][h][i] * c.v(rows.slots[b][i], kv)[j];
        out[b][h][j] = a * inv[b][h];
      }
}

// weigh_values for the query heads [g, g + NH) of B rows, from attend_rows' scores [B, heads, span].
template <int B, int NH>
TM_FMA TM_INLINE void weigh_heads(const Cache& c, const Rows<B>& rows, int64_t kv, int64_t g, int64_t g0,
                                  int64_t heads, int64_t stride, int64_t hd, const float* scores, int64_t span,
                                  const float* inv, float* out) {
  const float* s[B][NH];
  float w[B][NH];
  float* o[B][NH];
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h) {
      s[b][h] = scores + (b * heads + g + h - g0) * span;
      w[b][h] = inv[b * heads + g + h - g0];
      o[b][h] = out + b * stride + (g + h) * hd;
    }
  weigh_values<B, NH>(c, rows, kv, s, w, o);
}

// B query rows (q and out rows `stride` floats apart), query heads [g0, g1) (head g reads KV head
// g / group). Scores 8 positions at a time, the rows (over the shared positions) and the heads of a
// KV head sharing each key load; softmax; then the values, sharing each value load the same way.
// Every (row, head)'s result is its own: which rows and heads share a call changes no bit. head_dim
// is a multiple of 8 (checked by the caller).
template <int B>
TM_FMA TM_INLINE void attend_rows(const float* q, int64_t stride, const Cache& c, const Rows<B>& rows,
                                  int64_t g0, int64_t g1, int64_t group, float scale, float* out,
                                  std::vector<float>& scores) {
  const int64_t hd = c.hd, heads = g1 - g0, k0 = g0 / group, width = ((g1 - 1) / group + 1 - k0) * hd;
  int64_t span = 0;  // the longest row's positions
  for (int b = 0; b < B; ++b) span = std::max(span, rows.n[b]);
  scores.resize(B * heads * span);  // [B, heads, span]
  auto row_scores = [&](int b, int64_t g) __attribute__((always_inline)) {
    return scores.data() + (b * heads + g - g0) * span;
  };
  const v8 sc = {scale, scale, scale, scale, scale, scale, scale, scale};
  auto keys = [&](const int64_t* slots, int64_t i, int64_t kv, const float** k) __attribute__((always_inline)) {
    for (int p = 0; p < 8; ++p) k[p] = c.k(slots[i + p], kv);
  };
  int64_t i = 0;
  for (; i + 8 <= rows.shared; i += 8) {  // chunks of shared positions
    for (int64_t p = i + PREFETCH; p < std::min(rows.shared, i + PREFETCH + 8); ++p)
      prefetch(c.k(rows.slots[0][p], k0), width);
    for (int64_t g = g0; g < g1; ++g) {
      const float* k[8];
      keys(rows.slots[0], i, g / group, k);
      const float* qs[B];
      float* dst[B];
      for (int b = 0; b < B; ++b) {
        qs[b] = q + b * stride + g * hd;
        dst[b] = row_scores(b, g) + i;
      }
      score_chunk<B>(qs, k, hd, sc, dst);
    }
  }
  for (int b = 0; b < B; ++b) {  // the rest of each row: whole chunks, then position by position
    const int64_t nb = rows.n[b];
    const int64_t* slots = rows.slots[b];
    int64_t ib = i;
    for (; ib + 8 <= nb; ib += 8) {
      for (int64_t p = ib + PREFETCH; p < std::min(nb, ib + PREFETCH + 8); ++p) prefetch(c.k(slots[p], k0), width);
      for (int64_t g = g0; g < g1; ++g) {
        const float* k[8];
        keys(slots, ib, g / group, k);
        const float* qs[1] = {q + b * stride + g * hd};
        float* dst[1] = {row_scores(b, g) + ib};
        score_chunk<1>(qs, k, hd, sc, dst);
      }
    }
    for (; ib < nb; ++ib)
      for (int64_t g = g0; g < g1; ++g)
        row_scores(b, g)[ib] = fold8(dot_lanes(q + b * stride + g * hd, c.k(slots[ib], g / group), hd)) * scale;
  }
  std::vector<float> inv(B * heads);  // [B, heads]
  for (int b = 0; b < B; ++b)
    for (int64_t g = g0; g < g1; ++g) {
      float* s = row_scores(b, g);
      const int64_t nb = rows.n[b];
      float m = s[0];
      for (int64_t t = 1; t < nb; ++t) m = std::max(m, s[t]);
      exp_shift(s, nb, m);
      inv[b * heads + g - g0] = 1.f / sum(s, nb);
    }
  for (int64_t p = 0; p < std::min(rows.n[0], PREFETCH); ++p) prefetch(c.v(rows.slots[0][p], k0), width);
  // heads in runs that read one KV head: up to 4 for one row, 2 for two
  constexpr int64_t RUN = B == 1 ? 4 : 2;
  for (int64_t g = g0; g < g1;) {
    const int64_t kv = g / group, nh = std::min<int64_t>({RUN, g1 - g, (kv + 1) * group - g});
    switch (nh) {
      case 1: weigh_heads<B, 1>(c, rows, kv, g, g0, heads, stride, hd, scores.data(), span, inv.data(), out); break;
      case 2: weigh_heads<B, 2>(c, rows, kv, g, g0, heads, stride, hd, scores.data(), span, inv.data(), out); break;
      case 3: weigh_heads<B, 3>(c, rows, kv, g, g0, heads, stride, hd, scores.data(), span, inv.data(), out); break;
      default: weigh_heads<B, 4>(c, rows, kv, g, g0, heads, stride, hd, scores.data(), span, inv.data(), out); break;
    }
    g += nh;
  }
}

TM_FMA TM_CLONES void attend(const float* q, const Cache& c, const int64_t* slots, int64_t n, int64_t g0, int64_t g1,
                             int64_t group, float scale, float* out, std::vector<float>& scores) {
  attend_rows<1>(q, 0, c, Rows<1>{{slots}, {n}, n}, g0, g1, group, scale, out, scores);
}

TM_FMA TM_CLONES void attend2(const float* q, int64_t stride, const Cache& c, const Rows<2>& rows, int64_t g0,
                              int64_t g1, int64_t group, float scale, float* out, std::vector<float>& scores) {
  attend_rows<2>(q, stride, c, rows, g0, g1, group, scale, out, scores);
}

// What attention needs of a step's query rows, the same for every layer: each row's context as cache
// slots (rows with one block table, a prefill chunk's, share one list), and the work items. Row r's
// context is positions [lens[r] - window, lens[r]). An item is a row, or two adjacent rows whose
// contexts begin with the same cache blocks (a prefill chunk's consecutive rows, sequences over one
// cached prefix: they share those key and value loads), or, where there are fewer rows than threads
// and enough positions to pay for a second thread, a row and one KV head with the query heads that
// read it. The items are cut into one run per thread by their positions (the rows of a prefill chunk
// see ever longer contexts); an item's result is the same whichever thread runs it.
struct RowPlan {
  struct Item {
    int64_t row, rows, g0, g1, work, shared;
  };
  std::vector<std::vector<int64_t>> lists;  // cache slots of positions 0.. of each distinct block table
  std::vector<const int64_t*> slots;        // per row: the slot of its first position
  std::vector<int64_t> n;                   // per row: its positions
  std::vector<Item> items;
  std::vector<int64_t> start;  // run t holds items [start[t], start[t + 1])
};

RowPlan plan_rows(int64_t rows, int64_t heads, int64_t kv_heads, int64_t block_size, const int64_t* tables,
                  int64_t width, const int64_t* lens, int64_t window) {
  TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  const int64_t group = heads / kv_heads;
  RowPlan plan;
  std::vector<int64_t> list_of(rows);
  for (int64_t r = 0; r < rows; ++r) {  // a list per run of rows with the same table, as long as its longest row
    const int64_t* table = tables + r * width;
    if (r == 0 || std::memcmp(table, table - width, width * sizeof(int64_t)) != 0) plan.lists.emplace_back();
    list_of[r] = plan.lists.size() - 1;
    std::vector<int64_t>& list = plan.lists.back();
    for (int64_t p = list.size(); p < lens[r]; ++p) list.push_back(table[p / block_size] * block_size + p % block_size);
  }
  int64_t work = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first = window > 0 ? std::max<int64_t>(0, lens[r] - window) : 0;
    plan.slots.push_back(plan.lists[list_of[r]].data() + first);
    plan.n.push_back(lens[r] - first);
    work += lens[r] - first;
  }
  // positions at the start of rows r and r + 1 held in the same blocks (whole blocks, or all of the shorter)
  auto shared = [&](int64_t r) {
    const int64_t n = std::min(lens[r], lens[r + 1]);
    if (list_of[r] == list_of[r + 1]) return n;
    const int64_t *a = tables + r * width, *b = a + width;
    int64_t blocks = 0;
    while (blocks * block_size < n && a[blocks] == b[blocks]) ++blocks;
    return std::min(n, blocks * block_size);
  };
  const int64_t threads = at::get_num_threads();
  if (rows < threads && work >= 128) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t kv = 0; kv < kv_heads; ++kv) plan.items.push_back({r, 1, kv * group, (kv + 1) * group, plan.n[r], 0});
  } else {
    for (int64_t r = 0; r < rows;) {
      const int64_t common = window == 0 && r + 1 < rows ? shared(r) : 0;
      const bool pair = common > 0 && common >= std::min<int64_t>({lens[r], lens[r + 1], 64});
      plan.items.push_back({r, pair ? 2 : 1, 0, heads, pair ? lens[r] + lens[r + 1] : plan.n[r], common});
      r += pair ? 2 : 1;
    }
  }
  // run t: equal shares of the positions (and at least one item each)
  const int64_t items = plan.items.size(), runs = work >= 128 ? std::min(threads, items) : 1;
  int64_t total = 0;
  for (const RowPlan::Item& it : plan.items) total += it.work;
  plan.start.assign(runs + 1, items);
  plan.start[0] = 0;
  for (int64_t i = 0, t = 1, done = 0; i < items && t < runs; ++i) {
    done += plan.items[i].work;
    while (t < runs && done * runs >= total * t) plan.start[t++] = i + 1;
  }
  return plan;
}

// q [R, heads, hd] -> out [R, heads * hd] over one layer's cache, as planned.
void attention_rows(const RowPlan& plan, const float* q, int64_t heads, const Cache& c, float scale, float* out) {
  const int64_t group = heads / c.kv_heads, runs = plan.start.size() - 1;
  at::parallel_for(0, runs, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t i = plan.start[t0]; i < plan.start[t1]; ++i) {
      const RowPlan::Item& it = plan.items[i];
      const int64_t r = it.row;
      const float* qr = q + r * heads * c.hd;
      float* o = out + r * heads * c.hd;
      if (it.rows == 2) {
        const Rows<2> pair{{plan.slots[r], plan.slots[r + 1]}, {plan.n[r], plan.n[r + 1]}, it.shared};
        attend2(qr, heads * c.hd, c, pair, it.g0, it.g1, group, scale, o, scores);
      } else {
        attend(qr, c, plan.slots[r], plan.n[r], it.g0, it.g1, group, scale, o, scores);
      }
    }
  });
}

void write_kv(float* cache, int64_t kv_heads, int64_t hd, const float* k, const float* v, int64_t slot) {
  std::memcpy(cache + slot * 2 * kv_heads * hd, k, kv_heads * hd * sizeof(float));
  std::memcpy(cache + (slot * 2 + 1) * kv_heads * hd, v, kv_heads * hd * sizeof(float));
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

// ---- the operators, one call each from Python ----

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_float(w, "weight");
  const at::Tensor xc = x.contiguous();
  check_float(xc, "x");
  const int64_t n = w.numel();
  TORCH_CHECK(xc.size(-1) == n, "rms_norm: width mismatch");
  at::Tensor y = at::empty_like(xc);
  rms_norm_rows(xc.const_data_ptr<float>(), w.const_data_ptr<float>(), xc.numel() / n, n, static_cast<float>(eps),
                y.data_ptr<float>());
  return y;
}

// Rotates x [T, heads, hd] (rows may be strided, heads and head_dim dense) in place by cos, sin [T, hd].
void rope_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1 &&
                  x.stride(1) == x.size(2), "rope_: x must be float32 [T, heads, head_dim] with dense heads");
  check_float(cos, "cos");
  check_float(sin, "sin");
  const int64_t T = x.size(0), heads = x.size(1), hd = x.size(2), stride = x.stride(0);
  TORCH_CHECK(cos.numel() == T * hd && sin.numel() == T * hd, "rope: cos/sin must be [T, head_dim]");
  float* p = x.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      rope_row(p + t * stride, heads, hd, cos.const_data_ptr<float>() + t * hd, sin.const_data_ptr<float>() + t * hd);
  });
}

at::Tensor silu_mul(const at::Tensor& gu) {
  const at::Tensor g = gu.contiguous();
  check_float(g, "gate_up");
  const int64_t n = g.size(-1) / 2, rows = g.numel() / (2 * n);
  at::Tensor y = at::empty({rows, n}, g.options());
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul_row(g.const_data_ptr<float>() + r * 2 * n, n, y.data_ptr<float>() + r * n);
  });
  return y;
}

Cache cache_of(const at::Tensor& cache, int64_t block_size) {
  check_float(cache, "cache");
  TORCH_CHECK(cache.dim() == 4 && cache.size(1) == 2, "cache must be [slots, 2, kv_heads, head_dim]");
  TORCH_CHECK(cache.size(3) % 8 == 0, "row attention needs a head_dim that is a multiple of 8, got ", cache.size(3));
  return Cache{cache.const_data_ptr<float>(), cache.size(2), cache.size(3), block_size};
}

void check_rows(const at::Tensor& tables, const at::Tensor& lens, int64_t rows) {
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && tables.is_contiguous() &&
                  lens.is_contiguous() && tables.dim() == 2 && tables.size(0) == rows && lens.numel() == rows,
              "tables [R, blocks] and lens [R] must be contiguous int64");
}

// q [R, heads, hd]; tables [R, blocks]; lens [R]: each row's context length, itself included.
at::Tensor row_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables, const at::Tensor& lens,
                         int64_t block_size, int64_t window, double scale) {
  const at::Tensor qc = q.contiguous();
  check_float(qc, "q");
  const Cache c = cache_of(cache, block_size);
  const int64_t rows = qc.size(0), heads = qc.size(1);
  check_rows(tables, lens, rows);
  at::Tensor out = at::empty({rows, heads * c.hd}, qc.options());
  const RowPlan plan = plan_rows(rows, heads, c.kv_heads, block_size, tables.const_data_ptr<int64_t>(), tables.size(1),
                                 lens.const_data_ptr<int64_t>(), window);
  attention_rows(plan, qc.const_data_ptr<float>(), heads, c, static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

bool is_q4(const at::Tensor& w, int64_t K) { return w.size(1) == K / 32 * 128; }

// y += b, element by element (the same IEEE sums as PyTorch's add, without a dispatch per call).
TM_CLONES void add_into(float* y, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += b[i];
}

// y [R, N] = x @ W' (+ bias)
void packed_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& bias, int64_t N,
               at::Tensor& y) {
  tokenmill::lowbit_mm_into(x, w, s, N, is_q4(w, x.size(1)), y);
  if (bias.numel())
    for (int64_t r = 0; r < y.size(0); ++r) add_into(y.data_ptr<float>() + r * N, bias.const_data_ptr<float>(), N);
}

// x [R, H] += y [R, H], rows on all threads
void add_rows(at::Tensor& x, const at::Tensor& y) {
  const int64_t H = x.size(1);
  at::parallel_for(0, x.size(0), 16, [&](int64_t r0, int64_t r1) {
    add_into(x.data_ptr<float>() + r0 * H, y.const_data_ptr<float>() + r0 * H, (r1 - r0) * H);
  });
}

// Every decoder layer for R query rows (decodes and prefill chunks) whose K/V go to `slots`; x [R, H]
// is the embedded input, returned as the last layer's output. Per layer, `params` holds 12 tensors:
// input norm, qkv codes, scales, bias (empty if none), o codes, scales, post norm, gate_up codes,
// scales, down codes, scales, and the layer's float32 cache.
at::Tensor step_layers(const at::Tensor& x_in, at::TensorList params, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& lens, int64_t block_size,
                       int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
                       int64_t window, double scale) {
  constexpr size_t PER_LAYER = 12;
  TORCH_CHECK(params.size() % PER_LAYER == 0, "step_layers: 12 tensors per layer");
  at::Tensor x = x_in.contiguous().clone();
  check_float(x, "x");
  const int64_t R = x.size(0), H = x.size(1), qs = heads * head_dim, kvs = kv_heads * head_dim;
  check_rows(tables, lens, R);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == R, "slots [R] int64");
  const float feps = static_cast<float>(eps);
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const RowPlan plan = plan_rows(R, heads, kv_heads, block_size, tables.const_data_ptr<int64_t>(), tables.size(1),
                                 lens.const_data_ptr<int64_t>(), window);
  // this step's buffers, reused by every layer
  const auto f32 = x.options();
  at::Tensor h = at::empty_like(x), attn = at::empty({R, qs}, f32), qkv = at::empty({R, qs + 2 * kvs}, f32),
             q = at::empty({R, qs}, f32), o = at::empty({R, H}, f32), gu = at::empty({R, 2 * intermediate}, f32),
             act = at::empty({R, intermediate}, f32);
  for (size_t l = 0; l < params.size(); l += PER_LAYER) {
    const at::Tensor* p = params.data() + l;
    at::Tensor cache = p[11];
    const Cache c = cache_of(cache, block_size);
    rms_norm_rows(x.const_data_ptr<float>(), p[0].const_data_ptr<float>(), R, H, feps, h.data_ptr<float>());
    packed_mm(h, p[1], p[2], p[3], qs + 2 * kvs, qkv);
    float* qkvp = qkv.data_ptr<float>();
    float* cp = cache.data_ptr<float>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* row = qkvp + r * (qs + 2 * kvs);
        rope_row(row, heads + kv_heads, head_dim, cos.const_data_ptr<float>() + r * head_dim,
                 sin.const_data_ptr<float>() + r * head_dim);
        write_kv(cp, kv_heads, head_dim, row + qs, row + qs + kvs, slot[r]);
        std::memcpy(q.data_ptr<float>() + r * qs, row, qs * sizeof(float));  // q rows, dense [R, heads, hd]
      }
    });
    attention_rows(plan, q.const_data_ptr<float>(), heads, c, static_cast<float>(scale), attn.data_ptr<float>());
    packed_mm(attn, p[4], p[5], at::Tensor(), H, o);
    add_rows(x, o);
    rms_norm_rows(x.const_data_ptr<float>(), p[6].const_data_ptr<float>(), R, H, feps, h.data_ptr<float>());
    packed_mm(h, p[7], p[8], at::Tensor(), 2 * intermediate, gu);
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        silu_mul_row(gu.const_data_ptr<float>() + r * 2 * intermediate, intermediate, act.data_ptr<float>() + r * intermediate);
    });
    packed_mm(act, p[9], p[10], at::Tensor(), H, o);
    add_rows(x, o);
  }
  return x;
}

// Structured outputs: rows[i] of x keeps only the tokens whose bit is set in bitmask[i] (int32
// words, token t at bit t % 32 of word t / 32, as llguidance writes it); the rest become -inf.
void mask_logits_(at::Tensor x, const at::Tensor& rows, const at::Tensor& bitmask) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "mask_logits_: x must be float32 2-D");
  TORCH_CHECK(bitmask.scalar_type() == at::kInt && bitmask.is_contiguous() && bitmask.size(0) == rows.size(0),
              "mask_logits_: bitmask must be int32 [rows, words]");
  const int64_t V = x.size(1), W = bitmask.size(1), R = rows.size(0);
  TORCH_CHECK(W * 32 >= V, "mask_logits_: the bitmask is narrower than the vocabulary");
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bitmask.const_data_ptr<int32_t>());
  float* xp = x.data_ptr<float>();
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < R; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < x.size(0), "mask_logits_: row out of range");
    float* row = xp + rp[i] * V;
    const uint32_t* words = bp + i * W;
    for (int64_t w = 0; w * 32 < V; ++w) {
      const uint32_t word = words[w];
      if (word == 0xffffffffu) continue;
      const int64_t end = std::min<int64_t>(32, V - w * 32);
      if (word == 0) {  // the common case under a grammar: nothing in these 32 tokens is allowed
        std::fill(row + w * 32, row + w * 32 + end, ninf);
        continue;
      }
      for (int64_t b = 0; b < end; ++b)
        if (!((word >> b) & 1u)) row[w * 32 + b] = ninf;
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("mask_logits_(Tensor(a!) x, Tensor rows, Tensor bitmask) -> ()");
  m.def("row_attention(Tensor q, Tensor cache, Tensor tables, Tensor lens, int block_size, int window, float scale) -> Tensor");
  m.def("step_layers(Tensor x, Tensor[] params, Tensor cos, Tensor sin, Tensor slots, Tensor tables, Tensor lens, "
        "int block_size, int heads, int kv_heads, int head_dim, int intermediate, float eps, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rope_", rope_);
  m.impl("silu_mul", silu_mul);
  m.impl("row_attention", row_attention);
  m.impl("mask_logits_", mask_logits_);
  m.impl("step_layers", step_layers);
}
