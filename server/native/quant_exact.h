// The AVX2 decoder of every block type (chunks decoded in registers) and the exact kernels (float32 FMAs over
// the dequantized chunks); included by quant_kernels.cpp only, where LORAPLEX_QUANT_AVX2 is set.
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

struct Chunk {
  __m256i q;  // 32 bytes, weight order
  float a0, b0, a1, b1;
};

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Asks for the weight bytes PREFETCH_BYTES past [p, p + bytes) while p's are computed: with several activation rows
// per weight block, and in the exact mode, the hardware prefetcher alone leaves the block stream waiting on memory
// (2048x8192 Q6_K int8 at 8 rows 1.5x faster with it); int8 at one row streams fast enough without (slower with).
inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_BYTES + at), _MM_HINT_T0);
}

inline __m256i low_bits(__m256i v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(static_cast<char>(mask)));
}

// 16 bytes of nibbles -> 32 bytes in weight order (low nibbles first).
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

// 32 bits -> 32 bytes, 0x10 where the bit is set.
inline __m256i fifth_bits(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                                0x0303030303030303LL));
  const __m256i select = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// 8 bytes -> 8 floats.
inline __m256 bytes_to_floats(uint64_t bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes))));
}

inline uint64_t pair(uint32_t lo, uint32_t hi) { return lo | static_cast<uint64_t>(hi) << 32; }

// A super-block's (a, b) per chunk (Q4_K, Q5_K: 8) or per half-chunk (Q2_K, Q3_K, Q6_K: 16), decoded with
// vector ops once per super-block (the same values as the scalar decoders: one rounding of d x scale).
struct KScales {
  alignas(32) float a[16];
  alignas(32) float b[16];
};

template <int64_t T>
inline void k_scales(const uint8_t* blk, KScales& s) {
  if constexpr (T == Q4_K || T == Q5_K) {  // the 6-bit packing of k_scales_mins, four bytes at a time
    const uint32_t u0 = u32_at(blk + 4), u1 = u32_at(blk + 8), u2 = u32_at(blk + 12);
    const uint32_t sc_lo = u0 & 0x3F3F3F3F, sc_hi = (u2 & 0x0F0F0F0F) | ((u0 >> 2) & 0x30303030);
    const uint32_t mn_lo = u1 & 0x3F3F3F3F, mn_hi = ((u2 >> 4) & 0x0F0F0F0F) | ((u1 >> 2) & 0x30303030);
    _mm256_store_ps(s.a, _mm256_mul_ps(_mm256_set1_ps(half_at(blk)), bytes_to_floats(pair(sc_lo, sc_hi))));
    _mm256_store_ps(s.b, _mm256_mul_ps(_mm256_set1_ps(-half_at(blk + 2)), bytes_to_floats(pair(mn_lo, mn_hi))));
  } else if constexpr (T == Q3_K) {  // q3_scales, four at a time: low nibbles, then 2 high bits from bytes 8-11
    const uint32_t u0 = u32_at(blk + 96), u1 = u32_at(blk + 100), u2 = u32_at(blk + 104);
    const uint32_t m4 = 0x0F0F0F0F, m2 = 0x03030303;
    const uint32_t w0 = (u0 & m4) | ((u2 & m2) << 4), w1 = (u1 & m4) | (((u2 >> 2) & m2) << 4);
    const uint32_t w2 = ((u0 >> 4) & m4) | (((u2 >> 4) & m2) << 4), w3 = ((u1 >> 4) & m4) | (((u2 >> 6) & m2) << 4);
    const __m256 d = _mm256_set1_ps(half_at(blk + 108)), bias = _mm256_set1_ps(32.f), four = _mm256_set1_ps(-4.f);
    const __m256 a0 = _mm256_mul_ps(d, _mm256_sub_ps(bytes_to_floats(pair(w0, w1)), bias));
    const __m256 a1 = _mm256_mul_ps(d, _mm256_sub_ps(bytes_to_floats(pair(w2, w3)), bias));
    _mm256_store_ps(s.a, a0), _mm256_store_ps(s.a + 8, a1);
    _mm256_store_ps(s.b, _mm256_mul_ps(four, a0)), _mm256_store_ps(s.b + 8, _mm256_mul_ps(four, a1));
  } else if constexpr (T == Q2_K) {  // scale byte: low nibble scale, high nibble min
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(sc, m4), hi = _mm_and_si128(_mm_srli_epi16(sc, 4), m4);
    const __m256 d = _mm256_set1_ps(half_at(blk + 80)), dmin = _mm256_set1_ps(-half_at(blk + 82));
    auto floats = [](__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); };
    _mm256_store_ps(s.a, _mm256_mul_ps(d, floats(lo)));
    _mm256_store_ps(s.a + 8, _mm256_mul_ps(d, floats(_mm_srli_si128(lo, 8))));
    _mm256_store_ps(s.b, _mm256_mul_ps(dmin, floats(hi)));
    _mm256_store_ps(s.b + 8, _mm256_mul_ps(dmin, floats(_mm_srli_si128(hi, 8))));
  } else if constexpr (T == Q6_K) {  // int8 scales
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));
    const __m256 d = _mm256_set1_ps(half_at(blk + 208)), bias = _mm256_set1_ps(-32.f);
    const __m256 a0 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
    const __m256 a1 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
    _mm256_store_ps(s.a, a0), _mm256_store_ps(s.a + 8, a1);
    _mm256_store_ps(s.b, _mm256_mul_ps(bias, a0)), _mm256_store_ps(s.b + 8, _mm256_mul_ps(bias, a1));
  }
}

// Calls f(chunk index, quants) for each chunk of the k-quant super-block at b, decoded in registers (32 bytes,
// weight order, the unsigned quants without their offset).
template <int64_t T, class F>
inline __attribute__((always_inline)) void k_quants(const uint8_t* b, F&& f) {
  if constexpr (T == Q2_K) {  // chunk 4h + s: bits 2s of qs[32h + l]
    #pragma GCC unroll 4
    for (int h = 0; h < 2; ++h) {
      const __m256i raw = load32(b + 16 + 32 * h);
      #pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) f(4 * h + s, low_bits(raw, 2 * s, 3));
    }
  } else if constexpr (T == Q3_K) {  // and bit c of hmask[l], the third bit
    const __m256i hmask = load32(b);
    #pragma GCC unroll 4
    for (int h = 0; h < 2; ++h) {
      const __m256i raw = load32(b + 32 + 32 * h);
      #pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const int c = 4 * h + s;
        f(c, _mm256_or_si256(low_bits(raw, 2 * s, 3), _mm256_slli_epi16(low_bits(hmask, c, 1), 2)));
      }
    }
  } else if constexpr (T == Q4_K || T == Q5_K) {  // chunk 2p + half: nibble `half` of qs[32p + l]
    const uint8_t* qs = b + (T == Q5_K ? 48 : 16);
    __m256i qh = _mm256_setzero_si256();
    if constexpr (T == Q5_K) qh = load32(b + 16);
    #pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m256i raw = load32(qs + 32 * p);
      #pragma GCC unroll 4
      for (int half = 0; half < 2; ++half) {
        const int c = 2 * p + half;
        __m256i q = low_bits(raw, 4 * half, 15);
        if constexpr (T == Q5_K) q = _mm256_or_si256(q, _mm256_slli_epi16(low_bits(qh, c, 1), 4));
        f(c, q);
      }
    }
  } else if constexpr (T == Q6_K) {  // chunk 4h + s: nibble s / 2 of ql[64h + 32 (s % 2) + l], bits 2s of qh
    #pragma GCC unroll 4
    for (int h = 0; h < 2; ++h) {
      const __m256i lo0 = load32(b + 64 * h), lo1 = load32(b + 64 * h + 32), qh = load32(b + 128 + 32 * h);
      #pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m256i low = low_bits(s % 2 ? lo1 : lo0, 4 * (s / 2), 15);
        f(4 * h + s, _mm256_or_si256(low, _mm256_slli_epi16(low_bits(qh, 2 * s, 3), 4)));
      }
    }
  }
}

// A 32-weight block's quants (weight order).
template <int64_t T>
inline __m256i small_quants(const uint8_t* b) {
  if constexpr (T == Q8_0) {
    return load32(b + 2);
  } else {
    constexpr bool has_m = T == Q4_1 || T == Q5_1, five = T == Q5_0 || T == Q5_1;
    __m256i q = nibbles(b + (has_m ? 4 : 2) + (five ? 4 : 0));
    if constexpr (five) q = _mm256_or_si256(q, fifth_bits(u32_at(b + (has_m ? 4 : 2))));
    return q;
  }
}

// The float16 at byte `at` of 8 consecutive blocks of BB bytes, as floats (eight scalar stores reloaded as a vector stall the load: 5-9% at one row).
template <int64_t BB>
inline __m256 halves8(const uint8_t* p, int at) {
  uint16_t h[8];
  for (int j = 0; j < 8; ++j) std::memcpy(&h[j], p + j * BB + at, 2);
  return _mm256_cvtph_ps(_mm_setr_epi16(static_cast<short>(h[0]), static_cast<short>(h[1]), static_cast<short>(h[2]),
                                        static_cast<short>(h[3]), static_cast<short>(h[4]), static_cast<short>(h[5]),
                                        static_cast<short>(h[6]), static_cast<short>(h[7])));
}

// Calls f(chunk index, Chunk) for each chunk of the block at b, decoded in registers.
template <int64_t T, class F>
inline __attribute__((always_inline)) void visit(const uint8_t* b, F&& f) {
  if constexpr (T == Q4_0 || T == Q4_1 || T == Q5_0 || T == Q5_1) {
    constexpr bool has_m = T == Q4_1 || T == Q5_1, five = T == Q5_0 || T == Q5_1;
    const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b));
    const __m256i q = small_quants<T>(b);
    const float off = has_m ? _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b + 2)) : (five ? -16.f : -8.f) * d;
    f(0, Chunk{q, d, off, d, off});
  } else if constexpr (T == Q8_0) {
    const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b));
    f(0, Chunk{load32(b + 2), d, 0.f, d, 0.f});
  } else {
    KScales sc;
    k_scales<T>(b, sc);
    k_quants<T>(b, [&](int c, __m256i q) {
      if constexpr (T == Q4_K || T == Q5_K)
        f(c, Chunk{q, sc.a[c], sc.b[c], sc.a[c], sc.b[c]});
      else
        f(c, Chunk{q, sc.a[2 * c], sc.b[2 * c], sc.a[2 * c + 1], sc.b[2 * c + 1]});
    });
  }
}

// A chunk's 32 weights as four vectors of 8 floats.
inline void chunk_floats(const Chunk& c, __m256 w[4]) {
  const __m128i lo = _mm256_castsi256_si128(c.q), hi = _mm256_extracti128_si256(c.q, 1);
  const __m256 a0 = _mm256_set1_ps(c.a0), b0 = _mm256_set1_ps(c.b0), a1 = _mm256_set1_ps(c.a1),
               b1 = _mm256_set1_ps(c.b1);
  w[0] = _mm256_fmadd_ps(a0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), b0);
  w[1] = _mm256_fmadd_ps(a0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), b0);
  w[2] = _mm256_fmadd_ps(a1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), b1);
  w[3] = _mm256_fmadd_ps(a1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), b1);
}

inline float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <int64_t T>
void dequantize_rows_avx(const uint8_t* blocks, int64_t row_bytes, int64_t k, int64_t n0, int64_t n1, float* w) {
  constexpr int64_t bw = block_weights(T), bb = block_bytes(T);
  const int64_t nb = k / bw;
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        float* dst = w + (r - n0) * k + b * bw;
        visit<T>(blocks + r * row_bytes + b * bb, [&](int c, const Chunk& ch) {
          __m256 v[4];
          chunk_floats(ch, v);
          for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + c * CHUNK + 8 * i, v[i]);
        });
      }
  });
}

// Exact: out[i, r] for R activation rows and weight rows r0..r1; each chunk dequantized once into registers,
// then four FMAs per activation row. A accumulators per row keep enough FMA chains in flight when R is small.
template <int64_t T, int R>
void exact_rows(const float* x, int64_t x_stride, const uint8_t* blocks, int64_t row_bytes, int64_t k, int64_t r0,
                int64_t r1, float* out, int64_t out_stride) {
  constexpr int A = R >= 8 ? 1 : (8 / R > 4 ? 4 : 8 / R);
  constexpr int64_t bw = block_weights(T), bb = block_bytes(T);
  const int64_t nb = k / bw;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[R][A];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < A; ++j) acc[i][j] = _mm256_setzero_ps();
    const uint8_t* row = blocks + r * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      prefetch_ahead(row + b * bb, bb);
      if constexpr (T == Q8_0) {  // straight from memory: 8-byte sign-extending loads (the 34-byte blocks split
        const uint8_t* blk = row + b * bb;  // a 32-byte load across cache lines every other block)
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(blk)));
        const float* xb = x + b * bw;
        for (int v = 0; v < 4; ++v) {
          const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * v));
          const __m256 w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
          for (int i = 0; i < R; ++i)
            acc[i][v % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + i * x_stride + 8 * v), acc[i][v % A]);
        }
        continue;
      }
      visit<T>(row + b * bb, [&](int c, const Chunk& ch) {
        __m256 w[4];
        chunk_floats(ch, w);
        const float* xb = x + b * bw + c * CHUNK;
        for (int i = 0; i < R; ++i)
          for (int v = 0; v < 4; ++v)
            acc[i][v % A] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xb + i * x_stride + 8 * v), acc[i][v % A]);
      });
    }
    for (int i = 0; i < R; ++i) {
      for (int j = 1; j < A; ++j) acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][j]);
      out[i * out_stride + r] = horizontal_sum(acc[i][0]);
    }
  }
}

}  // namespace

#endif  // LORAPLEX_QUANT_AVX2
