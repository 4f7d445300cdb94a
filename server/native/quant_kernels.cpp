// Linear layers over weights kept in GGUF's quantized blocks, on the CPU, float32 activations.
//
// Registered as torch ops (built with the other kernels by server/native/loader.py):
//   loraplex::quant_linear(x [M, K] f32, blocks [N, K / block_weights * block_bytes] uint8, qtype, out [M, N] f32,
//                          int8=False)
//       out = x @ W^T, W the dequantized weight [N, K].
//       int8=False (exact): each block is dequantized in registers and multiplied with the float32 activations,
//         equal to float32 matmul over the dequantized weight up to summation order.
//       int8=True (M <= INT8_DIRECT_ROWS, AVX2 only; elsewhere, and for larger M, exact): the activations are
//         rounded to int8 with one float scale per block (32 weights; 256 for the k-quants) and meet the blocks'
//         quants in integer dot products; the blocks' offsets b meet the exact float activations. Deviation from
//         exact: at most half a rounding step (max |x| of the block / 127 / 2) per activation times |a q|.
//   loraplex::quant_linear_forward(x [..., K], blocks, qtype, int8=False) -> [..., N]   (the same, allocating)
//   loraplex::quant_dequantize(blocks, qtype, K, reference=False) -> W [N, K] f32
//       reference=True: the scalar decoder (the portable path), else the vector one the kernels use.
//
// Every type is read as chunks of 32 weights: w[j] = a * q[j] + b, q[j] one byte (0..63, or int8 for Q8_0),
// (a, b) per half-chunk of 16 weights (both halves share them except in Q2_K, Q3_K, Q6_K, whose sub-blocks
// are 16 long). Layouts, as ggml stores them (d, dmin, m float16; "bit j of qh" is weight j's fifth bit):
//   Q4_0 (2)  32 weights: d, qs[16]                    q = nibble            a = d          b = -8d
//   Q4_1 (3)  32 weights: d, m, qs[16]                 q = nibble            a = d          b = m
//   Q5_0 (6)  32 weights: d, qh u32, qs[16]            q = nibble | bit<<4   a = d          b = -16d
//   Q5_1 (7)  32 weights: d, m, qh u32, qs[16]         q = nibble | bit<<4   a = d          b = m
//   Q8_0 (8)  32 weights: d, qs int8[32]               q = qs                a = d          b = 0
//   (nibbles: byte j holds weight j in its low 4 bits and weight j + 16 in its high 4 bits)
//   Q2_K (10) 256: scales[16], qs[64], d, dmin         16 x 16; scale byte: low 4 bits scale, high 4 bits min
//   Q3_K (11) 256: hmask[32], qs[64], scales[12], d    16 x 16; 6-bit scales - 32; q = 2 bits | hmask bit << 2, -4
//   Q4_K (12) 256: d, dmin, scales[12], qs[128]        8 x 32; 6-bit scale and min each
//   Q5_K (13) 256: d, dmin, scales[12], qh[32], qs[128]  as Q4_K, fifth bit of chunk c = bit c of qh[l]
//   Q6_K (14) 256: ql[128], qh[64], scales int8[16], d 16 x 16; q = 4 bits | 2 bits << 4, -32
// The per-type decoders below (unpack_ref, and visit / k_quants for AVX2) spell out where each chunk's bits lie.
//
// Direct kernels (M <= DIRECT_ROWS exact, INT8_DIRECT_ROWS int8) decode each weight block once per group of up to
// 8 activation rows, in registers, and dot it with every row of the group (tiles of ROW_TILE weight rows, so a
// group's re-reads come from cache), output rows split over torch's OpenMP team (calls under MIN_THREAD_WORK
// weights per thread stay on the caller's thread: the team's start and join cost more). The int8 kernels sum
// integer products as far as the scales allow: the k-quants' sub-block scales multiply 16-bit pair sums inside
// the integer dot product, so a super-block costs one conversion and one multiply-add per row; the 32-weight
// types reduce eight blocks' integer sums to one vector first. Larger M dequantizes tiles of TILE_ROWS weight rows
// and multiplies them with at::mm, a dense GEMM (AVX-512 where the CPU has it): faster than exact direct rows
// above 32-48 rows; int8 direct rows stayed ahead of it at every M measured (up to 256: 1.1-1.7x).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LORAPLEX_QUANT_AVX2 1
#endif

namespace {

constexpr int64_t CHUNK = 32;
constexpr int64_t DIRECT_ROWS = 32;
constexpr int64_t INT8_DIRECT_ROWS = 256;
constexpr int64_t TILE_ROWS = 256;
constexpr int64_t ROW_TILE = 16;
constexpr int64_t PREFETCH_BYTES = 2048;
constexpr int64_t MIN_THREAD_WORK = 1 << 17;  // weights x activation rows

// Weight rows per task in parallel_for: at least ROW_TILE, and enough that a thread's share is worth its start.
int64_t row_grain(int64_t m_rows, int64_t k) {
  return std::max(ROW_TILE, MIN_THREAD_WORK / std::max<int64_t>(1, m_rows * k));
}

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13,
                       Q6_K = 14 };

constexpr int64_t block_weights(int64_t t) { return t >= Q2_K ? 256 : 32; }

constexpr int64_t block_bytes(int64_t t) {
  switch (t) {
    case Q4_0: return 2 + 16;
    case Q4_1: return 4 + 16;
    case Q5_0: return 2 + 4 + 16;
    case Q5_1: return 4 + 4 + 16;
    case Q8_0: return 2 + 32;
    case Q2_K: return 16 + 64 + 4;
    case Q3_K: return 32 + 64 + 12 + 2;
    case Q4_K: return 4 + 12 + 128;
    case Q5_K: return 4 + 12 + 32 + 128;
    case Q6_K: return 128 + 64 + 16 + 2;
    default: return 0;
  }
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Q4_K / Q5_K: 8 scales and 8 mins of 6 bits in 12 bytes. Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7
// mins 0-3; scales and mins 4-7 take their low 4 bits from bytes 8-11 (low / high nibble) and their top 2 bits
// from the spare top bits of bytes 0-3 / 4-7.
inline void k_scales_mins(const uint8_t* s, int sc[8], int mn[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// Q3_K: 16 scales of 6 bits in 12 bytes: low 4 bits in the nibbles of bytes 0-7 (scales 0-7 low, 8-15 high),
// top 2 bits in bytes 8-11 (scale i: byte 8 + i % 4, bits 2 * (i / 4)); stored + 32.
inline void q3_scales(const uint8_t* s, int sc[16]) {
  for (int i = 0; i < 16; ++i) {
    const int low = i < 8 ? s[i] & 15 : s[i - 8] >> 4;
    const int high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    sc[i] = (low | (high << 4)) - 32;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Portable decoder: one block into its chunks.

struct ChunkRef {
  int8_t q[CHUNK];
  float a[2], b[2];  // for weights 0-15 and 16-31
};

inline void set_affine(ChunkRef& c, float a0, float b0, float a1, float b1) {
  c.a[0] = a0, c.b[0] = b0, c.a[1] = a1, c.b[1] = b1;
}

inline void nibbles_ref(const uint8_t* qs, int8_t* q) {
  for (int j = 0; j < 16; ++j) {
    q[j] = static_cast<int8_t>(qs[j] & 15);
    q[j + 16] = static_cast<int8_t>(qs[j] >> 4);
  }
}

inline void fifth_bits_ref(uint32_t qh, int8_t* q) {
  for (int j = 0; j < 32; ++j) q[j] = static_cast<int8_t>(q[j] | (((qh >> j) & 1) << 4));
}

// The chunks of the block at `b` (1 for the 32-weight types, 8 for the k-quants).
void unpack_ref(int64_t t, const uint8_t* b, ChunkRef* out) {
  switch (t) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
      const float d = half_at(b);
      const bool has_m = t == Q4_1 || t == Q5_1, five = t == Q5_0 || t == Q5_1;
      const uint8_t* qs = b + (has_m ? 4 : 2) + (five ? 4 : 0);
      nibbles_ref(qs, out->q);
      if (five) fifth_bits_ref(u32_at(b + (has_m ? 4 : 2)), out->q);
      const float off = has_m ? half_at(b + 2) : (five ? -16.f : -8.f) * d;
      set_affine(*out, d, off, d, off);
      return;
    }
    case Q8_0: {
      const float d = half_at(b);
      std::memcpy(out->q, b + 2, CHUNK);
      set_affine(*out, d, 0.f, d, 0.f);
      return;
    }
    case Q2_K: {
      const uint8_t *sc = b, *qs = b + 16;
      const float d = half_at(b + 80), dmin = half_at(b + 82);
      for (int c = 0; c < 8; ++c) {  // chunk c = 4h + s: bits 2s of qs[32h + l]
        const int h = c / 4, s = c % 4;
        for (int l = 0; l < 32; ++l) out[c].q[l] = static_cast<int8_t>((qs[32 * h + l] >> (2 * s)) & 3);
        set_affine(out[c], d * (sc[2 * c] & 15), -(dmin * (sc[2 * c] >> 4)), d * (sc[2 * c + 1] & 15),
                   -(dmin * (sc[2 * c + 1] >> 4)));
      }
      return;
    }
    case Q3_K: {
      const uint8_t *hmask = b, *qs = b + 32;
      const float d = half_at(b + 108);
      int sc[16];
      q3_scales(b + 96, sc);
      for (int c = 0; c < 8; ++c) {  // chunk c = 4h + s: bits 2s of qs[32h + l], bit c of hmask[l]
        const int h = c / 4, s = c % 4;
        for (int l = 0; l < 32; ++l)
          out[c].q[l] = static_cast<int8_t>(((qs[32 * h + l] >> (2 * s)) & 3) | (((hmask[l] >> c) & 1) << 2));
        const float a0 = d * static_cast<float>(sc[2 * c]), a1 = d * static_cast<float>(sc[2 * c + 1]);
        set_affine(out[c], a0, -4.f * a0, a1, -4.f * a1);
      }
      return;
    }
    case Q4_K: case Q5_K: {
      const float d = half_at(b), dmin = half_at(b + 2);
      int sc[8], mn[8];
      k_scales_mins(b + 4, sc, mn);
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (t == Q5_K ? 48 : 16);
      for (int c = 0; c < 8; ++c) {  // chunk c: nibble c % 2 of qs[32 (c / 2) + l]; Q5_K: bit c of qh[l]
        const uint8_t* src = qs + 32 * (c / 2);
        for (int l = 0; l < 32; ++l) {
          int q = c % 2 ? src[l] >> 4 : src[l] & 15;
          if (t == Q5_K) q |= ((qh[l] >> c) & 1) << 4;
          out[c].q[l] = static_cast<int8_t>(q);
        }
        const float a = d * static_cast<float>(sc[c]), off = -(dmin * static_cast<float>(mn[c]));
        set_affine(out[c], a, off, a, off);
      }
      return;
    }
    case Q6_K: {
      const uint8_t *ql = b, *qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = half_at(b + 208);
      for (int c = 0; c < 8; ++c) {  // chunk c = 4h + s: nibble s / 2 of ql[64h + 32 (s % 2) + l], bits 2s of qh[32h + l]
        const int h = c / 4, s = c % 4;
        const uint8_t* lo = ql + 64 * h + 32 * (s % 2);
        for (int l = 0; l < 32; ++l) {
          const int low = s / 2 ? lo[l] >> 4 : lo[l] & 15;
          out[c].q[l] = static_cast<int8_t>(low | (((qh[32 * h + l] >> (2 * s)) & 3) << 4));
        }
        const float a0 = d * static_cast<float>(sc[8 * h + 2 * s]), a1 = d * static_cast<float>(sc[8 * h + 2 * s + 1]);
        set_affine(out[c], a0, -32.f * a0, a1, -32.f * a1);
      }
      return;
    }
    default: TORCH_CHECK(false, "unsupported quantized type ", t);
  }
}

// The block's weights into w (block_weights(t) floats); w = fma(a, q, b), as the vector decoder computes it.
void dequantize_block_ref(int64_t t, const uint8_t* b, float* w) {
  ChunkRef chunks[8];
  unpack_ref(t, b, chunks);
  for (int64_t c = 0; c < block_weights(t) / CHUNK; ++c)
    for (int j = 0; j < CHUNK; ++j)
      w[c * CHUNK + j] = std::fma(chunks[c].a[j / 16], static_cast<float>(chunks[c].q[j]), chunks[c].b[j / 16]);
}

void dequantize_rows_ref(const uint8_t* blocks, int64_t row_bytes, int64_t t, int64_t k, int64_t n0, int64_t n1,
                         float* w) {
  const int64_t nb = k / block_weights(t), bb = block_bytes(t), bw = block_weights(t);
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) dequantize_block_ref(t, blocks + r * row_bytes + b * bb, w + (r - n0) * k + b * bw);
  });
}

// The portable decode path: each block dequantized into a buffer once, dotted with every activation row.
void direct_ref(const float* x, int64_t m_rows, int64_t x_stride, const uint8_t* blocks, int64_t row_bytes, int64_t t,
                int64_t n, int64_t k, float* out, int64_t out_stride) {
  const int64_t nb = k / block_weights(t), bb = block_bytes(t), bw = block_weights(t);
  at::parallel_for(0, n, row_grain(m_rows, k), [&](int64_t r0, int64_t r1) {
    float w[256];
    float acc[DIRECT_ROWS];
    for (int64_t r = r0; r < r1; ++r) {
      std::fill_n(acc, m_rows, 0.f);
      for (int64_t b = 0; b < nb; ++b) {
        dequantize_block_ref(t, blocks + r * row_bytes + b * bb, w);
        for (int64_t i = 0; i < m_rows; ++i) {
          const float* xi = x + i * x_stride + b * bw;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < bw; ++j) s += w[j] * xi[j];
          acc[i] += s;
        }
      }
      for (int64_t i = 0; i < m_rows; ++i) out[i * out_stride + r] = acc[i];
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 decoder and kernels.

#ifdef LORAPLEX_QUANT_AVX2
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

// Decode rows: weight rows split over the team; in each tile of ROW_TILE weight rows, activation rows in groups
// of 8, 4, 2, 1. `run.rows<R>(i0, t0, t1)` computes activation rows i0..i0+R over weight rows t0..t1.
template <class Run>
void over_tiles(int64_t m_rows, int64_t n, int64_t k, const Run& run) {
  at::parallel_for(0, n, row_grain(m_rows, k), [&](int64_t r0, int64_t r1) {
    for (int64_t t0 = r0; t0 < r1; t0 += ROW_TILE) {
      const int64_t t1 = std::min(r1, t0 + ROW_TILE);
      int64_t i0 = 0;
      for (; m_rows - i0 >= 8; i0 += 8) run.template rows<8>(i0, t0, t1);
      if (m_rows - i0 >= 4) run.template rows<4>(i0, t0, t1), i0 += 4;
      if (m_rows - i0 >= 2) run.template rows<2>(i0, t0, t1), i0 += 2;
      if (m_rows - i0 >= 1) run.template rows<1>(i0, t0, t1);
    }
  });
}

template <int64_t T>
struct ExactRun {
  const float* x;
  int64_t x_stride;
  const uint8_t* blocks;
  int64_t row_bytes, k;
  float* out;
  int64_t out_stride;

  template <int R>
  void rows(int64_t i0, int64_t t0, int64_t t1) const {
    exact_rows<T, R>(x + i0 * x_stride, x_stride, blocks, row_bytes, k, t0, t1, out + i0 * out_stride, out_stride);
  }
};

template <int64_t T>
struct Int8Run {
  Int8Rows x;
  const uint8_t* blocks;
  int64_t row_bytes;
  float* out;
  int64_t out_stride;

  template <int R>
  void rows(int64_t i0, int64_t t0, int64_t t1) const {
    const Int8Rows xr{x.q + i0 * x.k, x.d + i0 * (x.k / x.group), x.sums + i0 * (x.k / x.span), x.k, x.group, x.span};
    if constexpr (block_weights(T) == CHUNK)
      int8_rows_small<T, R>(xr, blocks, row_bytes, x.k, t0, t1, out + i0 * out_stride, out_stride);
    else
      int8_rows_k<T, R>(xr, blocks, row_bytes, x.k, t0, t1, out + i0 * out_stride, out_stride);
  }
};

template <int64_t T>
void direct_avx(const float* x, int64_t m_rows, int64_t x_stride, const uint8_t* blocks, int64_t row_bytes, int64_t n,
                int64_t k, float* out, int64_t out_stride, bool int8) {
  if (!int8) return over_tiles(m_rows, n, k, ExactRun<T>{x, x_stride, blocks, row_bytes, k, out, out_stride});
  constexpr int64_t group = block_weights(T), span = group == CHUNK ? CHUNK : 16;
  const int64_t nd = m_rows * k / group, ns = m_rows * k / span;
  auto q = at::empty({m_rows * k}, at::kChar);
  auto floats = at::empty({nd + ns}, at::kFloat);
  float* d = floats.data_ptr<float>();
  float* sums = d + nd;
  const Int8Rows xr{q.data_ptr<int8_t>(), d, sums, k, group, span};
  quantize_activations(x, m_rows, x_stride, xr);
  over_tiles(m_rows, n, k, Int8Run<T>{xr, blocks, row_bytes, out, out_stride});
}

#define LORAPLEX_FOR_EACH_TYPE(CASE) \
  CASE(Q4_0) CASE(Q4_1) CASE(Q5_0) CASE(Q5_1) CASE(Q8_0) CASE(Q2_K) CASE(Q3_K) CASE(Q4_K) CASE(Q5_K) CASE(Q6_K)
#endif

// ---------------------------------------------------------------------------------------------------------------
// Entry points.

void dequantize_rows(const uint8_t* blocks, int64_t row_bytes, int64_t t, int64_t k, int64_t n0, int64_t n1, float* w,
                     bool reference) {
#ifdef LORAPLEX_QUANT_AVX2
  if (!reference) {
    switch (t) {
#define LORAPLEX_CASE(T) \
  case T: return dequantize_rows_avx<T>(blocks, row_bytes, k, n0, n1, w);
      LORAPLEX_FOR_EACH_TYPE(LORAPLEX_CASE)
#undef LORAPLEX_CASE
    }
  }
#endif
  dequantize_rows_ref(blocks, row_bytes, t, k, n0, n1, w);
}

void direct(const float* x, int64_t m_rows, int64_t x_stride, const uint8_t* blocks, int64_t row_bytes, int64_t t,
            int64_t n, int64_t k, float* out, int64_t out_stride, bool int8) {
#ifdef LORAPLEX_QUANT_AVX2
  switch (t) {
#define LORAPLEX_CASE(T) \
  case T: return direct_avx<T>(x, m_rows, x_stride, blocks, row_bytes, n, k, out, out_stride, int8);
    LORAPLEX_FOR_EACH_TYPE(LORAPLEX_CASE)
#undef LORAPLEX_CASE
  }
#endif
  (void)int8;  // no integer dot products without AVX2: the exact path
  direct_ref(x, m_rows, x_stride, blocks, row_bytes, t, n, k, out, out_stride);
}

// The most rows the direct kernels take; above, dequantized tiles and at::mm.
int64_t direct_rows(bool int8) {
#ifdef LORAPLEX_QUANT_AVX2
  if (int8) return INT8_DIRECT_ROWS;
#endif
  (void)int8;
  return DIRECT_ROWS;
}

void check(const at::Tensor& blocks, int64_t t, int64_t k) {
  TORCH_CHECK(block_bytes(t) > 0, "unsupported quantized type ", t);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "blocks must be a contiguous uint8 [N, bytes per row]");
  TORCH_CHECK(k > 0 && k % block_weights(t) == 0, "in_features must be a positive multiple of ", block_weights(t));
  TORCH_CHECK(blocks.size(1) == k / block_weights(t) * block_bytes(t), "blocks per row disagree with in_features");
}

at::Tensor quant_dequantize(const at::Tensor& blocks, int64_t qtype, int64_t k, bool reference) {
  check(blocks, qtype, k);
  auto w = at::empty({blocks.size(0), k}, blocks.options().dtype(at::kFloat));
  dequantize_rows(blocks.data_ptr<uint8_t>(), blocks.size(1), qtype, k, 0, blocks.size(0), w.data_ptr<float>(),
                  reference);
  return w;
}

void quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, const at::Tensor& out, bool int8) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "quant_linear is float32 only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1,
              "expected x [M, K] and out [M, N], contiguous rows");
  const int64_t m = x.size(0), k = x.size(1), n = blocks.size(0);
  check(blocks, qtype, k);
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "out must be [M, N]");
  const uint8_t* B = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1);
  if (m == 0) return;
  if (m <= direct_rows(int8)) {
    direct(x.data_ptr<float>(), m, x.stride(0), B, row_bytes, qtype, n, k, out.data_ptr<float>(), out.stride(0), int8);
    return;
  }
  auto tile = at::empty({std::min(n, TILE_ROWS), k}, x.options());
  for (int64_t n0 = 0; n0 < n; n0 += TILE_ROWS) {
    const int64_t rows = std::min(TILE_ROWS, n - n0);
    dequantize_rows(B, row_bytes, qtype, k, n0, n0 + rows, tile.data_ptr<float>(), false);
    out.narrow(1, n0, rows).copy_(at::mm(x, tile.narrow(0, 0, rows).t()));
  }
}

// x [..., K] (float32, any layout) -> [..., N]: the module's forward in one call (it runs ~200 times a step).
at::Tensor quant_linear_forward(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, bool int8) {
  TORCH_CHECK(x.dim() >= 1, "x must have a feature dimension");
  auto rows = x.reshape({-1, x.size(-1)});
  if (rows.scalar_type() != at::kFloat || rows.stride(1) != 1) rows = rows.to(at::kFloat).contiguous();
  auto out = at::empty({rows.size(0), blocks.size(0)}, rows.options());
  quant_linear(rows, blocks, qtype, out, int8);
  auto shape = x.sizes().vec();
  shape.back() = blocks.size(0);
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("quant_linear(Tensor x, Tensor blocks, int qtype, Tensor(a!) out, bool int8=False) -> ()");
  m.def("quant_linear_forward(Tensor x, Tensor blocks, int qtype, bool int8=False) -> Tensor");
  m.def("quant_dequantize(Tensor blocks, int qtype, int in_features, bool reference=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_linear_forward", &quant_linear_forward);
  m.impl("quant_dequantize", &quant_dequantize);
}
