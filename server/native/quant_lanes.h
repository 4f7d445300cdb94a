// The lane layouts' kernels (VNNI builds; the layouts are described in quant_formats.h): int8 with one `dpbusd`
// per 32 weights and row, and exact (for the start-up check, which runs every linear exact); included by
// quant_kernels.cpp only, after quant_int8.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#if defined(LORAPLEX_QUANT_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LORAPLEX_QUANT_LANES 1

namespace {

// One super-block of activations (256 values of type E) in lane order: lane j of chunk c takes the 4 values at
// lane_source(T, c, 4 j), as the quants are reordered.
template <int64_t T, typename E>
inline void to_lane_order(const E* from, E* to) {
  for (int c = 0; c < 8; ++c)
    for (int j = 0; j < 8; ++j) std::memcpy(to + 32 * c + 4 * j, from + lane_source(T, c, 4 * j), 4 * sizeof(E));
}

// The int8 activations of every row in lane order, in place.
template <int64_t T>
void permute_lanes(const Int8Rows& xr, int64_t m_rows) {
  int8_t* q = const_cast<int8_t*>(xr.q);
  for (int64_t at = 0; at < m_rows * xr.k; at += 256) {
    int8_t from[256];
    std::memcpy(from, q + at, 256);
    to_lane_order<T>(from, q + at);
  }
}

// The 8 chunks of a lane-layout super-block (the unsigned quants).
template <int64_t T>
inline __attribute__((always_inline)) void lane_quants(const uint8_t* b, __m256i q[8]) {
  if constexpr (T == Q4_K_L) {
    for (int p = 0; p < 4; ++p) {
      const __m256i raw = load32(b + 20 + 32 * p);
      q[2 * p] = low_bits(raw, 0, 15), q[2 * p + 1] = low_bits(raw, 4, 15);
    }
  } else {
    k_quants<Q6_K>(b, [&](int c, __m256i v) { q[c] = v; });
  }
}

// A lane-layout super-block decoded: its chunks' quants, and per sub-block d x scale (`a`) and offset (`b`),
// set h holding sub-blocks 8h..8h+7 (Q6_K_L has two sets): the same floats as the file order's decoders.
template <int64_t T>
inline __attribute__((always_inline)) void lane_block(const uint8_t* blk, __m256i q[8], __m256 a[2], __m256 b[2]) {
  lane_quants<T>(blk, q);
  if constexpr (T == Q4_K_L) {
    auto floats = [&](int at) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + at))));
    };
    a[0] = _mm256_mul_ps(_mm256_set1_ps(half_at(blk)), floats(4));
    b[0] = _mm256_mul_ps(_mm256_set1_ps(-half_at(blk + 2)), floats(12));
  } else {
    KScales s;
    k_scales<Q6_K>(blk, s);
    a[0] = _mm256_load_ps(s.a), a[1] = _mm256_load_ps(s.a + 8), b[0] = _mm256_load_ps(s.b), b[1] = _mm256_load_ps(s.b + 8);
  }
}

// int8, lane layouts: per super-block and row, one dot product per chunk into the lanes of its sub-blocks (Q6_K_L:
// two sets of 8), then one conversion and one multiply by the sub-blocks' d x scale per set and one multiply-add
// by d_x; the offsets meet the exact sums of x per sub-block (Q4_K_L: 32; Q6_K_L: 16).
template <int64_t T, int R>
void int8_rows_lanes(const Int8Rows& xr, const uint8_t* blocks, int64_t row_bytes, int64_t k, int64_t r0, int64_t r1,
                     float* out, int64_t out_stride) {
  constexpr int64_t bb = block_bytes(T);
  constexpr int sets = T == Q6_K_L ? 2 : 1;
  const int64_t nb = k / 256;
  TORCH_CHECK(xr.span * 8 * sets == 256);
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const uint8_t* row = blocks + r * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * bb;
      if constexpr (R > 1) prefetch_ahead(blk, bb);
      __m256i q[8];
      __m256 scales[2], offsets[2];  // per sub-block: d x scale, and the offset b
      lane_block<T>(blk, q, scales, offsets);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const int8_t* xq = xr.q + i * xr.k + b * 256;
        __m256i lanes[2][2] = {};  // [set][chain]
        for (int c = 0; c < 8; ++c) {
          __m256i& into = lanes[sets == 2 ? c / 4 : 0][c % 2];
          into = _mm256_dpbusd_epi32(into, q[c], load32(reinterpret_cast<const uint8_t*>(xq + 32 * c)));
        }
        // The sub-blocks' integer sums (exact in float: at most 32 x 63 x 127) times d x scale, then times d_x.
        __m256 dots = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lanes[0][0], lanes[0][1])), scales[0]);
        if constexpr (sets == 2)
          dots = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lanes[1][0], lanes[1][1])), scales[1], dots);
        acc[i] = _mm256_fmadd_ps(dots, _mm256_set1_ps(xr.d[i * nb + b]), acc[i]);
        const float* sums = xr.sums + (i * nb + b) * (8 * sets);  // 8 x sets sums per super-block (span 32 or 16)
        for (int h = 0; h < sets; ++h) acc[i] = _mm256_fmadd_ps(offsets[h], _mm256_loadu_ps(sums + 8 * h), acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) out[i * out_stride + r] = horizontal_sum(acc[i]);
  }
}

// The same over two weight rows per pass: each activation chunk loaded once feeds both rows' dot products, which
// halves the activation loads per product (where 8 activation rows outgrow L1, the single-row loop above re-reads
// them from L2 for every weight row).
template <int64_t T, int R>
void int8_rows_lanes_pairs(const Int8Rows& xr, const uint8_t* blocks, int64_t row_bytes, int64_t k, int64_t r0,
                           int64_t r1, float* out, int64_t out_stride) {
  constexpr int64_t bb = block_bytes(T);
  constexpr int sets = T == Q6_K_L ? 2 : 1;
  const int64_t nb = k / 256;
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    __m256 acc[2][R];
    for (int w = 0; w < 2; ++w)
      for (int i = 0; i < R; ++i) acc[w][i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i q[2][8];
      __m256 scales[2][2], offsets[2][2];
      for (int w = 0; w < 2; ++w) {
        const uint8_t* blk = blocks + (r + w) * row_bytes + b * bb;
        prefetch_ahead(blk, bb);
        lane_block<T>(blk, q[w], scales[w], offsets[w]);
      }
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const int8_t* xq = xr.q + i * xr.k + b * 256;
        __m256i lanes[2][2] = {};  // [weight row][set]
        for (int c = 0; c < 8; ++c) {
          const __m256i xc = load32(reinterpret_cast<const uint8_t*>(xq + 32 * c));
          const int h = sets == 2 ? c / 4 : 0;
          lanes[0][h] = _mm256_dpbusd_epi32(lanes[0][h], q[0][c], xc);
          lanes[1][h] = _mm256_dpbusd_epi32(lanes[1][h], q[1][c], xc);
        }
        const __m256 dx = _mm256_set1_ps(xr.d[i * nb + b]);
        const float* sums = xr.sums + (i * nb + b) * (8 * sets);  // 8 x sets sums per super-block (span 32 or 16)
        for (int w = 0; w < 2; ++w) {
          __m256 dots = _mm256_mul_ps(_mm256_cvtepi32_ps(lanes[w][0]), scales[w][0]);
          if constexpr (sets == 2) dots = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes[w][1]), scales[w][1], dots);
          acc[w][i] = _mm256_fmadd_ps(dots, dx, acc[w][i]);
          for (int h = 0; h < sets; ++h) acc[w][i] = _mm256_fmadd_ps(offsets[w][h], _mm256_loadu_ps(sums + 8 * h), acc[w][i]);
        }
      }
    }
    for (int w = 0; w < 2; ++w)
      for (int i = 0; i < R; ++i) out[i * out_stride + r + w] = horizontal_sum(acc[w][i]);
  }
  if (r < r1) int8_rows_lanes<T, R>(xr, blocks, row_bytes, k, r, r1, out, out_stride);
}

// Exact, lane layouts: x reordered as the quants are (per super-block, 4 floats per lane), then each chunk's
// weights fma(a, q, b) in registers (a, b per lane: its sub-block's), the same floats as the file order's
// decoder, four multiply-adds per row; sums in lane order.
template <int64_t T>
void permute_lanes_float(const float* x, int64_t m_rows, int64_t x_stride, int64_t k, float* to) {
  for (int64_t i = 0; i < m_rows; ++i)
    for (int64_t at = 0; at < k; at += 256) to_lane_order<T>(x + i * x_stride + at, to + i * k + at);
}

template <int64_t T, int R>
void exact_rows_lanes(const float* x, int64_t k, const uint8_t* blocks, int64_t row_bytes, int64_t r0, int64_t r1,
                      float* out, int64_t out_stride) {
  constexpr int64_t bb = block_bytes(T);
  constexpr int sets = T == Q6_K_L ? 2 : 1;
  const int64_t nb = k / 256;
  __m256i pick[4];  // weights 8v..8v+7 of a chunk: lanes 2v (4 weights) and 2v + 1
  for (int v = 0; v < 4; ++v) pick[v] = _mm256_setr_epi32(2 * v, 2 * v, 2 * v, 2 * v, 2 * v + 1, 2 * v + 1, 2 * v + 1, 2 * v + 1);
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const uint8_t* row = blocks + r * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * bb;
      prefetch_ahead(blk, bb);
      __m256i q[8];
      __m256 a[2], off[2];
      lane_block<T>(blk, q, a, off);
      for (int c = 0; c < 8; ++c) {
        const int h = sets == 2 ? c / 4 : 0;
        const __m128i lo = _mm256_castsi256_si128(q[c]), hi = _mm256_extracti128_si256(q[c], 1);
        const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int v = 0; v < 4; ++v) {
          const __m256 w = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(a[h], pick[v]),
                                           _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[v])),
                                           _mm256_permutevar8x32_ps(off[h], pick[v]));
          for (int i = 0; i < R; ++i)
            acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * k + b * 256 + 32 * c + 8 * v), acc[i]);
        }
      }
    }
    for (int i = 0; i < R; ++i) out[i * out_stride + r] = horizontal_sum(acc[i]);
  }
}

}  // namespace

#endif  // LORAPLEX_QUANT_LANES
