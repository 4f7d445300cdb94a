// GGUF's quantized blocks for the quantized linears (included by quant_kernels.cpp only): sizes, the scale
// decoders, and the portable decoder (every type, one block into its chunks), with the portable decode path.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {


constexpr int64_t CHUNK = 32;
constexpr int64_t DIRECT_ROWS = 32;
constexpr int64_t INT8_DIRECT_ROWS = 256;
constexpr int64_t TILE_ROWS = 256;
constexpr int64_t ROW_TILE = 16;
constexpr int64_t L1_ACTIVATION_BYTES = 32 << 10;  // int8 activations a row group keeps in a core's L1
constexpr int64_t PREFETCH_BYTES = 2048;
constexpr int64_t MIN_THREAD_WORK = 1 << 17;  // weights x activation rows

// Weight rows per task in parallel_for: at least ROW_TILE, and enough that a thread's share is worth its start.
int64_t row_grain(int64_t m_rows, int64_t k) {
  return std::max(ROW_TILE, MIN_THREAD_WORK / std::max<int64_t>(1, m_rows * k));
}

// GGML's type ids, and two layouts of our own (ids 100 + the type they hold; see "Lane layouts" below).
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13,
                       Q6_K = 14, Q4_K_L = 112, Q6_K_L = 114 };

constexpr bool is_lanes(int64_t t) { return t == Q4_K_L || t == Q6_K_L; }

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
    case Q4_K_L: return 4 + 8 + 8 + 128;
    case Q6_K_L: return 128 + 64 + 16 + 2;
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
// Lane layouts: Q4_K and Q6_K for the int8 mode's VNNI kernel (loraplex::quant_int8_layout converts a tensor). The
// same quants and scales; the quants reordered so that 32-bit lane j of decoded chunk c holds 4 weights of one
// sub-block: j (Q4_K_L), j + 8 (c / 4) (Q6_K_L). One unsigned-by-signed dot product per chunk then accumulates
// every sub-block in its own lane, and the sub-block scales multiply once per super-block instead of once per
// chunk (the activations take the same order, see permute_lanes).
//   Q4_K_L (112) 256: d, dmin, scales u8[8], mins u8[8], qs[128]   chunk c: nibble c % 2 of qs[32 (c / 2) + l]
//   Q6_K_L (114) 256: as Q6_K (chunk c = 4h + s where Q6_K has it)

// The weight (its index in the super-block) at byte l of lane-layout chunk c.
constexpr int lane_source(int64_t t, int c, int l) {
  const int j = l / 4, b = l % 4;
  return t == Q4_K_L ? 32 * j + 4 * c + b : 16 * (j + 8 * (c / 4)) + 4 * (c % 4) + b;
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
    case Q4_K_L: case Q6_K_L: {
      ChunkRef lanes[8];
      if (t == Q6_K_L) {
        unpack_ref(Q6_K, b, lanes);  // the quants (chunk order as Q6_K's); the scales set below
      } else {
        for (int c = 0; c < 8; ++c)
          for (int l = 0; l < 32; ++l) lanes[c].q[l] = static_cast<int8_t>((b[20 + 32 * (c / 2) + l] >> (4 * (c % 2))) & 15);
      }
      for (int c = 0; c < 8; ++c)
        for (int l = 0; l < 32; ++l) {
          const int w = lane_source(t, c, l);
          out[w / 32].q[w % 32] = lanes[c].q[l];
        }
      for (int c = 0; c < 8; ++c) {
        if (t == Q4_K_L) {
          const float a = half_at(b) * static_cast<float>(b[4 + c]), off = -(half_at(b + 2) * static_cast<float>(b[12 + c]));
          set_affine(out[c], a, off, a, off);
        } else {
          const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
          const float d = half_at(b + 208), a0 = d * static_cast<float>(sc[2 * c]), a1 = d * static_cast<float>(sc[2 * c + 1]);
          set_affine(out[c], a0, -32.f * a0, a1, -32.f * a1);
        }
      }
      return;
    }
    default: TORCH_CHECK(false, "unsupported quantized type ", t);
  }
}

// A lane layout's weight order: source[32 c + l] = lane_source(T, c, l).
template <int64_t T>
struct LaneOrder {
  uint8_t source[256];
  constexpr LaneOrder() : source() {
    for (int c = 0; c < 8; ++c)
      for (int l = 0; l < 32; ++l) source[32 * c + l] = static_cast<uint8_t>(lane_source(T, c, l));
  }
};

// A Q4_K (T = Q4_K_L) or Q6_K (Q6_K_L) block `from` written in its lane layout at `to`.
template <int64_t T>
void to_lanes(const uint8_t* from, uint8_t* to) {
  static constexpr LaneOrder<T> order;
  uint8_t q[256], lanes[256];  // the quants in weight order, then in lane order
  if constexpr (T == Q4_K_L) {  // chunk 2p + half: nibble `half` of qs[32p + l]
    for (int p = 0; p < 4; ++p)
      for (int l = 0; l < 32; ++l) {
        const uint8_t v = from[16 + 32 * p + l];
        q[64 * p + l] = v & 15, q[64 * p + 32 + l] = v >> 4;
      }
  } else {  // chunk 4h + s: nibble s / 2 of ql[64h + 32 (s % 2) + l], bits 2s of qh[32h + l]
    for (int c = 0; c < 8; ++c) {
      const int h = c / 4, s = c % 4;
      for (int l = 0; l < 32; ++l)
        q[32 * c + l] = static_cast<uint8_t>(((from[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 15) |
                                             (((from[128 + 32 * h + l] >> (2 * s)) & 3) << 4));
    }
  }
  for (int i = 0; i < 256; ++i) lanes[i] = q[order.source[i]];
  if constexpr (T == Q4_K_L) {
    int sc[8], mn[8];
    k_scales_mins(from + 4, sc, mn);
    std::memcpy(to, from, 4);  // d, dmin
    for (int c = 0; c < 8; ++c) to[4 + c] = static_cast<uint8_t>(sc[c]), to[12 + c] = static_cast<uint8_t>(mn[c]);
    for (int p = 0; p < 4; ++p)
      for (int l = 0; l < 32; ++l)
        to[20 + 32 * p + l] = static_cast<uint8_t>(lanes[64 * p + l] | (lanes[64 * p + 32 + l] << 4));
    return;
  }
  std::memset(to, 0, 192);  // ql, qh: chunk c = 4h + s as Q6_K stores it
  std::memcpy(to + 192, from + 192, 18);  // scales, d
  for (int c = 0; c < 8; ++c) {
    const int h = c / 4, s = c % 4;
    for (int l = 0; l < 32; ++l) {
      to[64 * h + 32 * (s % 2) + l] |= static_cast<uint8_t>((lanes[32 * c + l] & 15) << (4 * (s / 2)));
      to[128 + 32 * h + l] |= static_cast<uint8_t>((lanes[32 * c + l] >> 4) << (2 * s));
    }
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

}  // namespace
