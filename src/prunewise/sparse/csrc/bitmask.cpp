// Weights stored as their non-zero values (row-major) plus a packed bitmask of their positions
// (one bit per weight, least significant bit first, each row padded to whole bytes): the product
// x W^T for a few token rows, and the dense matrix back, reading only that compressed form.
//
// With AVX-512F each 16 columns of a row cost one expand (the next popcount(bits) values spread
// to the lanes the bits name, zeros elsewhere) and one fused multiply-add per token row, so a row
// reads its values and mask once whatever the token count. With AVX2, FMA and F16C but no AVX-512
// (AMD Zen 1-3, most desktop CPUs) each 8 columns cost a load of the next 8 values, a permute by a
// 256-entry table indexed by the mask byte, a lane mask and one FMA per token row. Elsewhere a
// scalar loop over the set bits does the same work (slow: the Python side does not use it for
// products). 16-bit values are read 16 at a time, so the values buffer must hold 16 elements of
// padding after the last row (the Python side allocates it). With AVX512-BF16 and VBMI2, bf16
// weights against bf16 activations take a dot-product path (row_tile_dot).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PRUNEWISE_AVX2 1
#endif

namespace {

enum Kind { F32 = 0, BF16 = 1, F16 = 2 };

Kind kind_of(const torch::Tensor& values) {
  switch (values.scalar_type()) {
    case torch::kFloat32: return F32;
    case torch::kBFloat16: return BF16;
    case torch::kFloat16: return F16;
    default: TORCH_CHECK(false, "bitmask kernels take float32, bfloat16 or float16 values, not ", values.scalar_type());
  }
}

template <int KIND>
inline float value_at(const char* base, int64_t i) {
  if constexpr (KIND == F32) {
    float f;
    std::memcpy(&f, base + 4 * i, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, base + 2 * i, 2);
    if constexpr (KIND == BF16) {
      uint32_t b = static_cast<uint32_t>(h) << 16;
      float f;
      std::memcpy(&f, &b, 4);
      return f;
    } else {
      return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
    }
  }
}

constexpr int item_size(int kind) { return kind == F32 ? 4 : 2; }

// The row's bits for columns [16c, 16c + 16): two bytes, or one in a row whose tail has 8 or fewer.
inline uint32_t chunk_bits(const uint8_t* m, int64_t c, int64_t mbytes) {
  uint32_t bits = m[2 * c];
  if (2 * c + 1 < mbytes) bits |= static_cast<uint32_t>(m[2 * c + 1]) << 8;
  return bits;
}

// fn(column, index of its value) for every set bit of one row's mask, in column order.
template <typename Fn>
inline void for_each_set_bit(const uint8_t* m, int64_t mbytes, int64_t k, Fn fn) {
  for (int64_t b = 0; b < mbytes; ++b) {
    for (uint32_t byte = m[b]; byte; byte &= byte - 1) fn(8 * b + __builtin_ctz(byte), k++);
  }
}

template <int KIND>
void linear_scalar(const float* x, int64_t n, const char* vals, const uint8_t* mask, int64_t mbytes,
                   const int64_t* offs, int64_t cols, float* out, int64_t rows, int64_t r0, int64_t r1) {
  float acc[16];
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t tn = std::min<int64_t>(16, n - t0);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t t = 0; t < tn; ++t) acc[t] = 0.f;
      for_each_set_bit(mask + r * mbytes, mbytes, offs[r], [&](int64_t c, int64_t k) {
        const float v = value_at<KIND>(vals, k);
        for (int64_t t = 0; t < tn; ++t) acc[t] += v * x[(t0 + t) * cols + c];
      });
      for (int64_t t = 0; t < tn; ++t) out[(t0 + t) * rows + r] = acc[t];
    }
  }
}

template <int KIND>
void unpack_scalar(const char* vals, const uint8_t* mask, int64_t mbytes, const int64_t* offs, int64_t cols,
                   char* dense, int64_t d0, int64_t r0, int64_t r1) {
  constexpr int item = item_size(KIND);
  for (int64_t r = r0; r < r1; ++r) {
    char* row = dense + (r - d0) * cols * item;
    std::memset(row, 0, cols * item);
    for_each_set_bit(mask + r * mbytes, mbytes, offs[r],
                     [&](int64_t c, int64_t k) { std::memcpy(row + c * item, vals + k * item, item); });
  }
}

// tile(std::integral_constant<int, T>, t) for token rows [t, t + T) of n in tiles of 8, then 4, 2, 1.
template <typename Tile>
inline void token_tiles(int64_t n, Tile tile) {
  int64_t t = 0;
  for (; n - t >= 8; t += 8) tile(std::integral_constant<int, 8>{}, t);
  if (n - t >= 4) {
    tile(std::integral_constant<int, 4>{}, t);
    t += 4;
  }
  if (n - t >= 2) {
    tile(std::integral_constant<int, 2>{}, t);
    t += 2;
  }
  if (n - t >= 1) tile(std::integral_constant<int, 1>{}, t);
}

#if defined(__AVX512F__)

// Values are prefetched into L2 this many bytes ahead, and into L1 NEAR bytes ahead: the hardware
// prefetcher alone leaves a cold 70% sparse fp32 matrix read at about half the machine's bandwidth,
// one prefetch 4 KiB ahead into L1 at 65-80% of it, the two at 75-85% (benchmarks/RESULTS.md).
constexpr int PREFETCH = 16384;
constexpr int NEAR = 2048;

template <int KIND>
inline __m512 expand16(const char* p, __mmask16 bits) {
  if constexpr (KIND == F32) {
    return _mm512_maskz_expandloadu_ps(bits, p);
  } else {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __m512 v;
    if constexpr (KIND == BF16) {
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      v = _mm512_cvtph_ps(raw);
    }
    return _mm512_maskz_expand_ps(bits, v);
  }
}

// One weight row against T token rows (x and out start at the tile's first token). With one or two
// token rows a single accumulator per token would make every chunk wait for the previous chunk's
// FMA, so U consecutive chunks go to U independent accumulators.
template <int KIND, int T>
inline void row_tile(const float* x, const char* p, const uint8_t* m, int64_t mbytes, int64_t cols, float* out,
                     int64_t rows) {
  constexpr int item = item_size(KIND);
  constexpr int U = T >= 4 ? 1 : (T == 2 ? 2 : 4);
  const int64_t full = cols / 16;
  const int rem = static_cast<int>(cols % 16);
  __m512 acc[U][T];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t) acc[u][t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + U <= full; c += U) {
    uint64_t group = 0;
    std::memcpy(&group, m + 2 * c, 2 * U);
    for (int u = 0; u < U; ++u) {
      const uint16_t bits = static_cast<uint16_t>(group >> (16 * u));
      if (u == 0) {
        _mm_prefetch(p + PREFETCH, _MM_HINT_T1);
        _mm_prefetch(p + NEAR, _MM_HINT_T0);
      }
      const __m512 w = expand16<KIND>(p, bits);
      p += __builtin_popcount(bits) * item;
      for (int t = 0; t < T; ++t)
        acc[u][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * cols + 16 * (c + u)), acc[u][t]);
    }
  }
  for (; c < full; ++c) {
    uint16_t bits;
    std::memcpy(&bits, m + 2 * c, 2);
    const __m512 w = expand16<KIND>(p, bits);
    p += __builtin_popcount(bits) * item;
    for (int t = 0; t < T; ++t) acc[0][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * cols + 16 * c), acc[0][t]);
  }
  if (rem) {
    const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1);
    const __mmask16 bits = static_cast<__mmask16>(chunk_bits(m, full, mbytes)) & tail;
    const __m512 w = expand16<KIND>(p, bits);
    for (int t = 0; t < T; ++t)
      acc[0][t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(tail, x + t * cols + 16 * full), acc[0][t]);
  }
  for (int t = 0; t < T; ++t) {
    __m512 s = acc[0][t];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][t]);
    out[t * rows] = _mm512_reduce_add_ps(s);
  }
}

// Two weight rows against T token rows: each load of x feeds both rows' FMAs. From 8 token rows the
// kernel is bound by its loads and arithmetic, not by memory: 5-30% faster at 8-12 rows than one
// weight row at a time, slower at 4 (benchmarks/RESULTS.md), so only tiles of 8 take this path.
template <int KIND, int T>
inline void pair_tile(const float* x, const char* p0, const char* p1, const uint8_t* m0, const uint8_t* m1,
                      int64_t mbytes, int64_t cols, float* out, int64_t rows) {
  constexpr int item = item_size(KIND);
  const int64_t full = cols / 16;
  const int rem = static_cast<int>(cols % 16);
  __m512 a[T], b[T];
  for (int t = 0; t < T; ++t) a[t] = b[t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < full; ++c) {
    uint16_t u, v;
    std::memcpy(&u, m0 + 2 * c, 2);
    std::memcpy(&v, m1 + 2 * c, 2);
    if ((c & 3) == 0) {
      _mm_prefetch(p0 + PREFETCH, _MM_HINT_T1);
      _mm_prefetch(p1 + PREFETCH, _MM_HINT_T1);
      _mm_prefetch(p0 + NEAR, _MM_HINT_T0);
      _mm_prefetch(p1 + NEAR, _MM_HINT_T0);
    }
    const __m512 w0 = expand16<KIND>(p0, u), w1 = expand16<KIND>(p1, v);
    p0 += __builtin_popcount(u) * item;
    p1 += __builtin_popcount(v) * item;
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * cols + 16 * c);
      a[t] = _mm512_fmadd_ps(w0, xv, a[t]);
      b[t] = _mm512_fmadd_ps(w1, xv, b[t]);
    }
  }
  if (rem) {
    const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1);
    const __m512 w0 = expand16<KIND>(p0, static_cast<__mmask16>(chunk_bits(m0, full, mbytes)) & tail);
    const __m512 w1 = expand16<KIND>(p1, static_cast<__mmask16>(chunk_bits(m1, full, mbytes)) & tail);
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + t * cols + 16 * full);
      a[t] = _mm512_fmadd_ps(w0, xv, a[t]);
      b[t] = _mm512_fmadd_ps(w1, xv, b[t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    out[t * rows] = _mm512_reduce_add_ps(a[t]);
    out[t * rows + 1] = _mm512_reduce_add_ps(b[t]);
  }
}

template <int KIND>
void linear_avx512(const float* x, int64_t n, const char* vals, const uint8_t* mask, int64_t mbytes,
                   const int64_t* offs, int64_t cols, float* out, int64_t rows, int64_t r0, int64_t r1) {
  constexpr int item = item_size(KIND);
  const int64_t paired = n - n % 8;  // token rows taken two weight rows at a time, in tiles of 8
  int64_t r = r0;
  for (; paired && r + 2 <= r1; r += 2) {
    const char* p0 = vals + offs[r] * item;
    const char* p1 = vals + offs[r + 1] * item;
    const uint8_t* m0 = mask + r * mbytes;
    const uint8_t* m1 = m0 + mbytes;
    int64_t t = 0;
    for (; t < paired; t += 8)
      pair_tile<KIND, 8>(x + t * cols, p0, p1, m0, m1, mbytes, cols, out + t * rows + r, rows);
    for (int64_t q = r; q < r + 2; ++q) {
      const char* p = vals + offs[q] * item;
      const uint8_t* m = mask + q * mbytes;
      token_tiles(n - paired, [&](auto T, int64_t t) {
        const int64_t at = paired + t;
        row_tile<KIND, decltype(T)::value>(x + at * cols, p, m, mbytes, cols, out + at * rows + q, rows);
      });
    }
  }
  for (; r < r1; ++r) {
    const char* p = vals + offs[r] * item;
    const uint8_t* m = mask + r * mbytes;
    token_tiles(n, [&](auto T, int64_t t) {
      row_tile<KIND, decltype(T)::value>(x + t * cols, p, m, mbytes, cols, out + t * rows + r, rows);
    });
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
#define PRUNEWISE_BF16_DOT 1

// bf16 weights times bf16 token rows: each 32 columns cost one expand of 16-bit values straight
// from the packed stream and one VDPBF16PS per token row (pairs of exact bf16 products summed into
// float32), half the instructions of widening every value first. Used when the activations are
// bf16 already (a bf16 model), so nothing is rounded that the dense bf16 matmul would not round.
template <int T>
inline void row_tile_dot(const uint16_t* x, const char* p, const uint8_t* m, int64_t mbytes, int64_t cols,
                         float* out, int64_t rows) {
  constexpr int U = T >= 4 ? 1 : (T == 2 ? 2 : 4);
  const int64_t full = cols / 32;
  const int rem = static_cast<int>(cols % 32);
  __m512 acc[U][T];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t) acc[u][t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + U <= full; c += U) {
    _mm_prefetch(p + PREFETCH, _MM_HINT_T1);
    _mm_prefetch(p + NEAR, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      uint32_t bits;
      std::memcpy(&bits, m + 4 * (c + u), 4);
      const __m512i w = _mm512_maskz_expandloadu_epi16(bits, p);
      p += 2 * __builtin_popcount(bits);
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_loadu_si512(x + t * cols + 32 * (c + u));
        acc[u][t] = _mm512_dpbf16_ps(acc[u][t], (__m512bh)w, (__m512bh)xv);
      }
    }
  }
  for (; c < full; ++c) {
    uint32_t bits;
    std::memcpy(&bits, m + 4 * c, 4);
    const __m512i w = _mm512_maskz_expandloadu_epi16(bits, p);
    p += 2 * __builtin_popcount(bits);
    for (int t = 0; t < T; ++t)
      acc[0][t] = _mm512_dpbf16_ps(acc[0][t], (__m512bh)w, (__m512bh)_mm512_loadu_si512(x + t * cols + 32 * c));
  }
  if (rem) {
    const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << rem) - 1);
    uint32_t bits = 0;
    std::memcpy(&bits, m + 4 * full, static_cast<size_t>(mbytes - 4 * full));
    const __m512i w = _mm512_maskz_expandloadu_epi16(bits & tail, p);
    for (int t = 0; t < T; ++t) {
      const __m512i xv = _mm512_maskz_loadu_epi16(tail, x + t * cols + 32 * full);
      acc[0][t] = _mm512_dpbf16_ps(acc[0][t], (__m512bh)w, (__m512bh)xv);
    }
  }
  for (int t = 0; t < T; ++t) {
    __m512 s = acc[0][t];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][t]);
    out[t * rows] = _mm512_reduce_add_ps(s);
  }
}

void linear_dot(const uint16_t* x, int64_t n, const char* vals, const uint8_t* mask, int64_t mbytes,
                const int64_t* offs, int64_t cols, float* out, int64_t rows, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const char* p = vals + offs[r] * 2;
    const uint8_t* m = mask + r * mbytes;
    token_tiles(n, [&](auto T, int64_t t) {
      row_tile_dot<decltype(T)::value>(x + t * cols, p, m, mbytes, cols, out + t * rows + r, rows);
    });
  }
}

#endif

template <int KIND>
void unpack_avx512(const char* vals, const uint8_t* mask, int64_t mbytes, const int64_t* offs, int64_t cols,
                   char* dense, int64_t d0, int64_t r0, int64_t r1) {
  constexpr int item = item_size(KIND);
  const int64_t full = cols / 16;
  const int rem = static_cast<int>(cols % 16);
  const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const char* p = vals + offs[r] * item;
    const uint8_t* m = mask + r * mbytes;
    char* row = dense + (r - d0) * cols * item;
    for (int64_t c = 0; c <= full; ++c) {
      if (c == full && !rem) break;
      const __mmask16 bits = static_cast<__mmask16>(chunk_bits(m, c, mbytes)) & (c == full ? tail : 0xFFFF);
      char* dst = row + 16 * c * item;
      if constexpr (KIND == F32) {  // moves bits: NaN payloads and signed zeros survive
        const __m512 v = _mm512_maskz_expandloadu_ps(bits, p);
        if (c == full) _mm512_mask_storeu_ps(dst, tail, v); else _mm512_storeu_ps(dst, v);
      } else {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m512i v = _mm512_maskz_expand_epi32(bits, _mm512_cvtepu16_epi32(raw));
        if (c == full) _mm512_mask_cvtepi32_storeu_epi16(dst, tail, v);
        else _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(v));
      }
      p += __builtin_popcount(bits) * item;
    }
  }
}

#endif

#if defined(PRUNEWISE_AVX2)

// The expand AVX2 lacks, by table: lane j of RANK[byte] is the index among the next values of the
// value for column j (the number of set bits below bit j), with its sign bit set where bit j is
// clear, so that one blend by sign zeroes those lanes after the permute (which reads only the low
// three bits of each index).
struct Ranks {
  alignas(32) int32_t idx[256][8];
  Ranks() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) {
        const uint32_t rank = __builtin_popcount(static_cast<unsigned>(b) & ((1u << j) - 1)) & 7;
        idx[b][j] = static_cast<int32_t>(((b >> j) & 1) ? rank : (rank | 0x80000000u));
      }
  }
};
const Ranks RANK;

constexpr int PREFETCH2 = 16384;  // as the AVX-512 path: into L2 16 KiB ahead, into L1 2 KiB ahead
constexpr int NEAR2 = 2048;

// The 8 values of columns [8b, 8b + 8) as 32-bit lanes (the next popcount(byte) values at the
// lanes the bits name, zeros elsewhere); 16-bit values are widened (bf16: shifted into the high
// half, exact; fp16 converted, exact) unless RAW, which keeps their bits in the low half.
template <int KIND, bool RAW = false>
inline __m256i expand8(const char* p, uint32_t byte) {
  __m256i v;
  if constexpr (KIND == F32) {
    v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (RAW) v = _mm256_cvtepu16_epi32(raw);
    else if constexpr (KIND == BF16) v = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
    else v = _mm256_castps_si256(_mm256_cvtph_ps(raw));
  }
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(RANK.idx[byte]));
  v = _mm256_permutevar8x32_epi32(v, idx);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(v), _mm256_setzero_ps(), _mm256_castsi256_ps(idx)));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The token rows' x for columns [8b, 8b + n) of 8, zeros beyond (the row's last, partial byte).
inline __m256 load_x(const float* x, int n) {
  if (n == 8) return _mm256_loadu_ps(x);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(x, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes));
}

// One weight row against T token rows, U independent accumulators for few token rows (as row_tile).
template <int KIND, int T>
inline void row_tile2(const float* x, const char* p, const uint8_t* m, int64_t mbytes, int64_t cols, float* out,
                      int64_t rows) {
  constexpr int item = item_size(KIND);
  constexpr int U = T >= 4 ? 1 : (T == 2 ? 2 : 4);
  const int64_t full = cols / 8;
  const int rem = static_cast<int>(cols % 8);
  __m256 acc[U][T];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 4 <= full; b += 4) {
    _mm_prefetch(p + PREFETCH2, _MM_HINT_T1);
    _mm_prefetch(p + NEAR2, _MM_HINT_T0);
    uint32_t group;
    std::memcpy(&group, m + b, 4);
    for (int q = 0; q < 4; ++q) {
      const uint32_t byte = (group >> (8 * q)) & 0xFF;
      const __m256 w = _mm256_castsi256_ps(expand8<KIND>(p, byte));
      p += __builtin_popcount(byte) * item;
      for (int t = 0; t < T; ++t)
        acc[q % U][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * cols + 8 * (b + q)), acc[q % U][t]);
    }
  }
  for (; b < full + (rem ? 1 : 0); ++b) {
    const int n = b < full ? 8 : rem;
    const uint32_t byte = m[b] & ((1u << n) - 1);
    const __m256 w = _mm256_castsi256_ps(expand8<KIND>(p, byte));
    p += __builtin_popcount(byte) * item;
    for (int t = 0; t < T; ++t) acc[0][t] = _mm256_fmadd_ps(w, load_x(x + t * cols + 8 * b, n), acc[0][t]);
  }
  for (int t = 0; t < T; ++t) {
    __m256 s = acc[0][t];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][t]);
    out[t * rows] = hsum8(s);
  }
}

template <int KIND>
void linear_avx2(const float* x, int64_t n, const char* vals, const uint8_t* mask, int64_t mbytes,
                 const int64_t* offs, int64_t cols, float* out, int64_t rows, int64_t r0, int64_t r1) {
  constexpr int item = item_size(KIND);
  for (int64_t r = r0; r < r1; ++r) {
    const char* p = vals + offs[r] * item;
    const uint8_t* m = mask + r * mbytes;
    token_tiles(n, [&](auto T, int64_t t) {
      row_tile2<KIND, decltype(T)::value>(x + t * cols, p, m, mbytes, cols, out + t * rows + r, rows);
    });
  }
}

template <int KIND>
void unpack_avx2(const char* vals, const uint8_t* mask, int64_t mbytes, const int64_t* offs, int64_t cols,
                 char* dense, int64_t d0, int64_t r0, int64_t r1) {
  constexpr int item = item_size(KIND);
  const int64_t full = cols / 8;
  const int rem = static_cast<int>(cols % 8);
  for (int64_t r = r0; r < r1; ++r) {
    const char* p = vals + offs[r] * item;
    const uint8_t* m = mask + r * mbytes;
    char* row = dense + (r - d0) * cols * item;
    for (int64_t b = 0; b < full + (rem ? 1 : 0); ++b) {
      const int n = b < full ? 8 : rem;
      const uint32_t byte = m[b] & ((1u << n) - 1);
      const __m256i v = expand8<KIND, true>(p, byte);  // moves bits: NaN payloads and signed zeros survive
      char* dst = row + 8 * b * item;
      if constexpr (KIND == F32) {
        if (n == 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
        else std::memcpy(dst, &v, static_cast<size_t>(n) * 4);
      } else {
        const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        if (n == 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
        else std::memcpy(dst, &h, static_cast<size_t>(n) * 2);
      }
      p += __builtin_popcount(byte) * item;
    }
  }
}

#endif

void check(const torch::Tensor& values, const torch::Tensor& mask, const torch::Tensor& offsets, int64_t cols) {
  TORCH_CHECK(values.device().is_cpu() && mask.device().is_cpu() && offsets.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values: a contiguous 1-D tensor");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kUInt8 && mask.is_contiguous(), "mask: uint8 [rows, bytes]");
  TORCH_CHECK(mask.size(1) == (cols + 7) / 8, "mask: ", mask.size(1), " bytes per row for ", cols, " columns");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.numel() == mask.size(0) + 1, "offsets: int64 [rows + 1]");
  TORCH_CHECK(values.numel() >= offsets.data_ptr<int64_t>()[mask.size(0)] + 16, "values: 16 elements of padding needed");
}

// Rows per task: at least 64 Ki weights each, so a small layer is not split across threads (waking
// one costs more than it saves there), and about four tasks per thread in a large one.
int64_t grain(int64_t rows, int64_t cols) {
  return std::max<int64_t>({16, (65536 + cols - 1) / std::max<int64_t>(cols, 1), rows / (4 * at::get_num_threads())});
}

// Rows [r0, r1) of W into `dense`, whose first row is row d0, over torch's threads.
void unpack_rows(const torch::Tensor& values, const torch::Tensor& mask, const torch::Tensor& offsets, int64_t cols,
                 char* dense, int64_t d0, int64_t r0, int64_t r1) {
  const int64_t mbytes = mask.size(1);
  const char* vp = static_cast<const char*>(values.data_ptr());
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const Kind kind = kind_of(values);
  at::parallel_for(r0, r1, grain(r1 - r0, cols), [&](int64_t a, int64_t b) {
#if defined(__AVX512F__)
    if (kind == F32) unpack_avx512<F32>(vp, mp, mbytes, op, cols, dense, d0, a, b);
    else unpack_avx512<BF16>(vp, mp, mbytes, op, cols, dense, d0, a, b);  // 16-bit values move as integers
#elif defined(PRUNEWISE_AVX2)
    if (kind == F32) unpack_avx2<F32>(vp, mp, mbytes, op, cols, dense, d0, a, b);
    else unpack_avx2<BF16>(vp, mp, mbytes, op, cols, dense, d0, a, b);
#else
    if (kind == F32) unpack_scalar<F32>(vp, mp, mbytes, op, cols, dense, d0, a, b);
    else unpack_scalar<BF16>(vp, mp, mbytes, op, cols, dense, d0, a, b);
#endif
  });
}

}  // namespace

torch::Tensor linear(torch::Tensor x, torch::Tensor values, torch::Tensor mask, torch::Tensor offsets, int64_t cols) {
  check(values, mask, offsets, cols);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols && x.device().is_cpu(), "x: a CPU matrix [tokens, ", cols, "]");
  const int64_t n = x.size(0), rows = mask.size(0), mbytes = mask.size(1);
  const char* vp = static_cast<const char*>(values.data_ptr());
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const Kind kind = kind_of(values);
  auto out = torch::empty({n, rows}, x.options().dtype(torch::kFloat32));
  float* outp = out.data_ptr<float>();
#ifdef PRUNEWISE_BF16_DOT
  if (kind == BF16 && x.scalar_type() == torch::kBFloat16) {
    x = x.contiguous();
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
    at::parallel_for(0, rows, grain(rows, cols), [&](int64_t r0, int64_t r1) {
      linear_dot(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
    });
    return out;
  }
#endif
  x = x.to(torch::kFloat32).contiguous();  // other activations: widened, float32 arithmetic
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, rows, grain(rows, cols), [&](int64_t r0, int64_t r1) {
#if defined(__AVX512F__)
    if (kind == F32) linear_avx512<F32>(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
    else if (kind == BF16) linear_avx512<BF16>(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
    else linear_avx512<F16>(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
#elif defined(PRUNEWISE_AVX2)
    if (kind == F32) linear_avx2<F32>(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
    else if (kind == BF16) linear_avx2<BF16>(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
    else linear_avx2<F16>(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
#else
    if (kind == F32) linear_scalar<F32>(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
    else if (kind == BF16) linear_scalar<BF16>(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
    else linear_scalar<F16>(xp, n, vp, mp, mbytes, op, cols, outp, rows, r0, r1);
#endif
  });
  return out;
}

// W as a dense matrix in the values' dtype, written into `dense` (a caller's scratch matrix that is
// reused across calls: a fresh one per call costs a page fault per 4 KiB, more than the unpack).
void unpack(torch::Tensor values, torch::Tensor mask, torch::Tensor offsets, int64_t cols, torch::Tensor dense) {
  check(values, mask, offsets, cols);
  const int64_t rows = mask.size(0);
  TORCH_CHECK(dense.is_contiguous() && dense.numel() == rows * cols && dense.scalar_type() == values.scalar_type(),
              "dense: contiguous ", values.scalar_type(), " with ", rows * cols, " elements");
  unpack_rows(values, mask, offsets, cols, static_cast<char*>(dense.data_ptr()), 0, 0, rows);
}

// The sum of a float32 tensor read once with every thread, several independent accumulators each:
// what a streaming read of memory costs here, the bound the kernel is measured against.
double read_all(torch::Tensor a) {
  TORCH_CHECK(a.scalar_type() == torch::kFloat32 && a.is_contiguous() && a.device().is_cpu(), "a: contiguous float32");
  const float* p = a.data_ptr<float>();
  const int64_t n = a.numel();
  std::vector<double> parts(at::get_num_threads(), 0.0);
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    double t = 0.0;
    int64_t i = i0;
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 64 <= i1; i += 64) {
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(p + i));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(p + i + 16));
      s2 = _mm512_add_ps(s2, _mm512_loadu_ps(p + i + 32));
      s3 = _mm512_add_ps(s3, _mm512_loadu_ps(p + i + 48));
    }
    t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(PRUNEWISE_AVX2)
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 32 <= i1; i += 32) {
      s0 = _mm256_add_ps(s0, _mm256_loadu_ps(p + i));
      s1 = _mm256_add_ps(s1, _mm256_loadu_ps(p + i + 8));
      s2 = _mm256_add_ps(s2, _mm256_loadu_ps(p + i + 16));
      s3 = _mm256_add_ps(s3, _mm256_loadu_ps(p + i + 24));
    }
    t = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
    for (; i < i1; ++i) t += p[i];
    parts[at::get_thread_num()] += t;
  });
  double total = 0.0;
  for (double v : parts) total += v;
  return total;
}

std::string isa() {
#if defined(PRUNEWISE_BF16_DOT)
  return "avx512+bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(PRUNEWISE_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ W^T for W as values + bitmask (float32 out)");
  m.def("unpack", &unpack, "W as a dense matrix in the values' dtype, into a given tensor");
  m.def("read_all", &read_all, "sum of a float32 tensor read by every thread (a bandwidth probe)");
  m.def("isa", &isa, "which code path was compiled: avx512+bf16, avx512, avx2 or scalar");
}
