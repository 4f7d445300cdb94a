// The int8 mode's kernels: activations rounded to int8 per block, integer dot products with the blocks' quants
// (the k-quants' sub-block scales inside them); included by quant_kernels.cpp only, after quant_exact.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(LORAPLEX_QUANT_AVX2)
#include <immintrin.h>

namespace {

// Activations quantized for the int8 mode, per row: q (int8, x ~ d * q) with one d per `group` activations (32
// for the 32-weight types, as their blocks; 256 for the k-quants, so that a super-block's integer dot products
// share one scale), and the exact float sums of x over each `span` (32; 16 for the k-quants), which the blocks'
// offsets multiply.
struct Int8Rows {
  const int8_t* q;
  const float* d;
  const float* sums;
  int64_t k, group, span;
};

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

void quantize_activations(const float* x, int64_t m_rows, int64_t x_stride, const Int8Rows& xr) {
  const int64_t groups = xr.k / xr.group, chunks = xr.group / CHUNK;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  int8_t* q = const_cast<int8_t*>(xr.q);
  float *d = const_cast<float*>(xr.d), *sums = const_cast<float*>(xr.sums);
  for (int64_t i = 0; i < m_rows; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      const float* src = x + i * x_stride + g * xr.group;
      __m256 mx = _mm256_setzero_ps();
      for (int64_t j = 0; j < xr.group; j += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + j)));
      const float amax = horizontal_max(mx);
      d[i * groups + g] = amax / 127.f;
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        __m256 v[4];
        __m256i n[4];
        for (int j = 0; j < 4; ++j) {
          v[j] = _mm256_loadu_ps(src + c * CHUNK + 8 * j);
          n[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // nearest
        }
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * xr.k + g * xr.group + c * CHUNK),
                            _mm256_permutevar8x32_epi32(packed, order));
        float* s = sums + (i * xr.k + g * xr.group + c * CHUNK) / xr.span;
        if (xr.span == CHUNK) {
          s[0] = horizontal_sum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
        } else {
          s[0] = horizontal_sum(_mm256_add_ps(v[0], v[1]));
          s[1] = horizontal_sum(_mm256_add_ps(v[2], v[3]));
        }
      }
    }
}

// Sums of q[j] * x[j] over each group of 4 bytes: lanes 0-3 cover weights 0-15, lanes 4-7 weights 16-31.
template <bool Signed>
inline __m256i dot_groups(__m256i q, __m256i x) {
  __m256i u = q;
  if constexpr (Signed) {  // the unsigned operand must be q's magnitude; its sign moves onto x
    u = _mm256_sign_epi8(q, q);
    x = _mm256_sign_epi8(x, q);
  }
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}

// acc + the dot products of unsigned quants q (at most 63) and int8 x, each pair of products times its 16-bit
// scale in `scales`: |pair| <= 2 x 63 x 127 never saturates the 16-bit sums.
inline __m256i dot_scaled(__m256i acc, __m256i q, __m256i x, __m256i scales) {
  const __m256i pairs = _mm256_maddubs_epi16(q, x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, pairs, scales);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, scales));
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
// Q8_0's signed quants over several rows: each row's activations + 128 (one xor) take them in one unsigned-by-
// signed dot product (VNNI sums without the 16-bit saturation that rules this out for maddubs), and the
// 128 x sum(q) this adds is the block's, subtracted once for all rows; one row moves the signs instead.
template <int64_t T, int R>
constexpr bool offset_x = T == Q8_0 && R > 1;
#else
template <int64_t T, int R>
constexpr bool offset_x = false;
#endif

// q . x per group of 4 bytes (plus dot_x_excess(q) where offset_x).
template <int64_t T, int R>
inline __m256i dot_x(__m256i q, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  if constexpr (offset_x<T, R>)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_xor_si256(x, _mm256_set1_epi8(static_cast<char>(0x80))), q);
#endif
  return dot_groups<T == Q8_0>(q, x);
}

// 128 x the sums of q that dot_x adds where offset_x (per group of 4 bytes).
template <int64_t T, int R>
inline __m256i dot_x_excess(__m256i q) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  if constexpr (offset_x<T, R>)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(static_cast<char>(0x80)), q);
#endif
  (void)q;
  return _mm256_setzero_si256();
}

// The 8 lane sums of p[0..7], in order (unpacks and adds: cheaper than horizontal adds).
inline __m256i lane_sums(const __m256i p[8]) {
  __m256i t[4];
  for (int j = 0; j < 4; ++j)  // per 128 bits: [p2j 0+2, p2j+1 0+2, p2j 1+3, p2j+1 1+3]
    t[j] = _mm256_add_epi32(_mm256_unpacklo_epi32(p[2 * j], p[2 * j + 1]), _mm256_unpackhi_epi32(p[2 * j], p[2 * j + 1]));
  // per 128 bits: [p0, p1, p2, p3] (each its half's sum), then the same for p4..p7
  const __m256i lo = _mm256_add_epi32(_mm256_unpacklo_epi64(t[0], t[1]), _mm256_unpackhi_epi64(t[0], t[1]));
  const __m256i hi = _mm256_add_epi32(_mm256_unpacklo_epi64(t[2], t[3]), _mm256_unpackhi_epi64(t[2], t[3]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// int8, 32-weight types: out[i, r] = sum over blocks of d d_x (q . q_x) + b sum(x). Eight blocks at a time:
// their integer dot products reduced to one vector, converted and scaled with one multiply-add per row; the
// row's last blocks (under eight) one at a time.
template <int64_t T, int R>
void int8_rows_small(const Int8Rows& xr, const uint8_t* blocks, int64_t row_bytes, int64_t k, int64_t r0, int64_t r1,
                     float* out, int64_t out_stride) {
  constexpr int64_t bb = block_bytes(T);
  const int64_t nb = k / CHUNK, full = nb / 8 * 8;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const uint8_t* row = blocks + r * row_bytes;
    for (int64_t b0 = 0; b0 < full; b0 += 8) {
      if constexpr (R > 1) prefetch_ahead(row + b0 * bb, 8 * bb);
      __m256i q[8];
      const uint8_t* g = row + b0 * bb;
      for (int j = 0; j < 8; ++j) q[j] = small_quants<T>(g + j * bb);
      const __m256 dw = halves8<bb>(g, 0);
      __m256 bw;
      if constexpr (T == Q4_1 || T == Q5_1) bw = halves8<bb>(g, 2);
      else bw = _mm256_mul_ps(_mm256_set1_ps(T == Q4_0 ? -8.f : (T == Q5_0 ? -16.f : 0.f)), dw);
      __m256i excess = _mm256_setzero_si256();
      if constexpr (offset_x<T, R>) {
        __m256i e[8];
        for (int j = 0; j < 8; ++j) e[j] = dot_x_excess<T, R>(q[j]);
        excess = lane_sums(e);
      }
      for (int i = 0; i < R; ++i) {
        const int8_t* xq = xr.q + i * xr.k + b0 * CHUNK;
        __m256i p[8];
        for (int j = 0; j < 8; ++j) p[j] = dot_x<T, R>(q[j], load32(reinterpret_cast<const uint8_t*>(xq + j * CHUNK)));
        const int64_t at = i * nb + b0;
        const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(xr.d + at));
        const __m256i dots = _mm256_sub_epi32(lane_sums(p), excess);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[i]);
        if constexpr (T != Q8_0) acc[i] = _mm256_fmadd_ps(bw, _mm256_loadu_ps(xr.sums + at), acc[i]);
      }
    }
    float tail[R] = {};
    for (int64_t b = full; b < nb; ++b)
      visit<T>(row + b * bb, [&](int, const Chunk& ch) {
        const __m256i excess = dot_x_excess<T, R>(ch.q);
        for (int i = 0; i < R; ++i) {
          const __m256i xq = load32(reinterpret_cast<const uint8_t*>(xr.q + i * xr.k + b * CHUNK));
          const __m256 dots = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot_x<T, R>(ch.q, xq), excess));
          tail[i] += ch.a0 * xr.d[i * nb + b] * horizontal_sum(dots) + ch.b0 * xr.sums[i * nb + b];
        }
      });
    for (int i = 0; i < R; ++i) out[i * out_stride + r] = horizontal_sum(acc[i]) + tail[i];
  }
}

// A k-quant super-block's integer sub-block scales (one int8 per 16 weights; Q4_K, Q5_K: each one twice), the
// float d that scales their products, and the offsets b per 16 weights (as k_scales computes them).
struct KInts {
  __m128i scales;
  float d;
  __m256 b[2];
};

template <int64_t T>
inline void k_ints(const uint8_t* blk, KInts& s) {
  auto floats = [](__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); };
  __m128i mins = _mm_setzero_si128();  // Q2_K, Q4_K, Q5_K: the min per 16 weights, times -dmin below
  if constexpr (T == Q4_K || T == Q5_K) {  // the 6-bit packing of k_scales_mins
    const uint32_t u0 = u32_at(blk + 4), u1 = u32_at(blk + 8), u2 = u32_at(blk + 12);
    const uint32_t sc_lo = u0 & 0x3F3F3F3F, sc_hi = (u2 & 0x0F0F0F0F) | ((u0 >> 2) & 0x30303030);
    const uint32_t mn_lo = u1 & 0x3F3F3F3F, mn_hi = ((u2 >> 4) & 0x0F0F0F0F) | ((u1 >> 2) & 0x30303030);
    const __m128i sc = _mm_cvtsi64_si128(static_cast<long long>(pair(sc_lo, sc_hi)));
    const __m128i mn = _mm_cvtsi64_si128(static_cast<long long>(pair(mn_lo, mn_hi)));
    s.scales = _mm_unpacklo_epi8(sc, sc), mins = _mm_unpacklo_epi8(mn, mn);
    s.d = half_at(blk);
  } else if constexpr (T == Q3_K) {  // q3_scales, four at a time
    const uint32_t u0 = u32_at(blk + 96), u1 = u32_at(blk + 100), u2 = u32_at(blk + 104);
    const uint32_t m4 = 0x0F0F0F0F, m2 = 0x03030303;
    const uint32_t w0 = (u0 & m4) | ((u2 & m2) << 4), w1 = (u1 & m4) | (((u2 >> 2) & m2) << 4);
    const uint32_t w2 = ((u0 >> 4) & m4) | (((u2 >> 4) & m2) << 4), w3 = ((u1 >> 4) & m4) | (((u2 >> 6) & m2) << 4);
    s.scales = _mm_sub_epi8(_mm_setr_epi32(static_cast<int>(w0), static_cast<int>(w1), static_cast<int>(w2),
                                           static_cast<int>(w3)), _mm_set1_epi8(32));
    s.d = half_at(blk + 108);
  } else if constexpr (T == Q2_K) {  // scale byte: low nibble scale, high nibble min
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    s.scales = _mm_and_si128(sc, _mm_set1_epi8(0x0F));
    mins = _mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(0x0F));
    s.d = half_at(blk + 80);
  } else if constexpr (T == Q6_K) {
    s.scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));
    s.d = half_at(blk + 208);
  }
  if constexpr (T == Q3_K || T == Q6_K) {  // b = -4 a, -32 a
    const __m256 d = _mm256_set1_ps(s.d), bias = _mm256_set1_ps(T == Q3_K ? -4.f : -32.f);
    s.b[0] = _mm256_mul_ps(bias, _mm256_mul_ps(d, floats(s.scales)));
    s.b[1] = _mm256_mul_ps(bias, _mm256_mul_ps(d, floats(_mm_srli_si128(s.scales, 8))));
  } else {  // b = -dmin x min
    const __m256 dmin = _mm256_set1_ps(-half_at(blk + (T == Q2_K ? 82 : 2)));
    s.b[0] = _mm256_mul_ps(dmin, floats(mins));
    s.b[1] = _mm256_mul_ps(dmin, floats(_mm_srli_si128(mins, 8)));
  }
}

// Chunk c's scales as 16-bit lanes: lanes 0-7 (its weights 0-15) scale 2c, lanes 8-15 scale 2c + 1.
inline __m256i chunk_scales(__m128i scales, int c) {
  const __m128i pick = _mm_unpacklo_epi64(_mm_set1_epi8(static_cast<char>(2 * c)),
                                          _mm_set1_epi8(static_cast<char>(2 * c + 1)));
  return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
}

// int8, k-quants: per super-block, the sub-blocks' dot products times their integer scales summed in int32,
// then one conversion and one multiply-add by d d_x per row; the offsets meet the exact sums of x per 16.
template <int64_t T, int R>
void int8_rows_k(const Int8Rows& xr, const uint8_t* blocks, int64_t row_bytes, int64_t k, int64_t r0, int64_t r1,
                 float* out, int64_t out_stride) {
  constexpr int64_t bb = block_bytes(T), bw = block_weights(T);
  const int64_t nb = k / bw;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const uint8_t* row = blocks + r * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * bb;
      if constexpr (R > 1) prefetch_ahead(blk, bb);
      KInts s;
      k_ints<T>(blk, s);
      __m256i dots[R];
      for (int i = 0; i < R; ++i) dots[i] = _mm256_setzero_si256();
      k_quants<T>(blk, [&](int c, __m256i q) {
        const __m256i scales = chunk_scales(s.scales, c);
        const int8_t* xq = xr.q + b * bw + c * CHUNK;
        for (int i = 0; i < R; ++i)
          dots[i] = dot_scaled(dots[i], q, load32(reinterpret_cast<const uint8_t*>(xq + i * xr.k)), scales);
      });
      const __m256 dw = _mm256_set1_ps(s.d);
      for (int i = 0; i < R; ++i) {
        const float* sums = xr.sums + (i * nb + b) * (bw / 16);
        const __m256 scale = _mm256_mul_ps(dw, _mm256_broadcast_ss(xr.d + i * nb + b));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[i]), scale, acc[i]);
        acc[i] = _mm256_fmadd_ps(s.b[0], _mm256_loadu_ps(sums), acc[i]);
        acc[i] = _mm256_fmadd_ps(s.b[1], _mm256_loadu_ps(sums + 8), acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) out[i * out_stride + r] = horizontal_sum(acc[i]);
  }
}

}  // namespace

#endif  // LORAPLEX_QUANT_AVX2
