// Linear layers over weights kept in GGUF's quantized blocks, on the CPU, float32 activations.
//
// Registered as torch ops (built with the other kernels by server/native/loader.py):
//   loraplex::quant_linear(x [M, K] f32, blocks [N, K / 32 * block_bytes] uint8, qtype, out [M, N] f32)
//       out = x @ W^T, W the dequantized weight [N, K]; exact up to summation order (the weights are
//       dequantized in registers, activations stay float32).
//   loraplex::quant_dequantize(blocks, qtype, K) -> W [N, K] f32    (the reference, and prefill's tiles)
//
// Block types (32 weights each, `d` and `m` stored as float16), as ggml lays them out:
//   Q4_0 (qtype 2): d, 16 bytes of nibbles; w = d * (q - 8)
//   Q4_1 (qtype 3): d, m, 16 bytes of nibbles; w = d * q + m
//   Q8_0 (qtype 8): d, 32 int8; w = d * q
// Nibbles: byte j holds weight j (low 4 bits) and weight j + 16 (high 4 bits).
//
// Decode rows (M <= DIRECT_ROWS) stream each weight row once, dequantize each block into registers once
// per 8 activation rows, output rows split over torch's OpenMP team. Larger M (prefill chunks) dequantizes tiles of
// TILE_ROWS weight rows and multiplies them with at::mm: compute-bound, where a dense GEMM is fastest.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LORAPLEX_QUANT_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;
constexpr int64_t DIRECT_ROWS = 64;
constexpr int64_t TILE_ROWS = 256;

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };

int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return 2 + QK / 2;
    case Q4_1: return 4 + QK / 2;
    case Q8_0: return 2 + QK;
    default: TORCH_CHECK(false, "unsupported quantized type ", qtype);
  }
  return 0;
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// The 32 weights of one block, into w.
inline void dequantize_block(const uint8_t* b, int64_t qtype, float* w) {
  if (qtype == Q8_0) {
    const float d = half_at(b);
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
#pragma omp simd
    for (int64_t j = 0; j < QK; ++j) w[j] = d * static_cast<float>(q[j]);
    return;
  }
  const float d = half_at(b);
  const float m = qtype == Q4_1 ? half_at(b + 2) : -8.f * d;
  const uint8_t* q = b + (qtype == Q4_1 ? 4 : 2);
#pragma omp simd
  for (int64_t j = 0; j < QK / 2; ++j) {
    w[j] = d * static_cast<float>(q[j] & 0x0F) + m;
    w[j + QK / 2] = d * static_cast<float>(q[j] >> 4) + m;
  }
}

void dequantize_rows(const uint8_t* blocks, int64_t row_bytes, int64_t qtype, int64_t k, int64_t n0, int64_t n1,
                     float* w) {
  const int64_t nb = k / QK, bb = block_bytes(qtype);
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b)
        dequantize_block(blocks + r * row_bytes + b * bb, qtype, w + (r - n0) * k + b * QK);
  });
}

void check(const at::Tensor& blocks, int64_t qtype, int64_t k) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "blocks must be a contiguous uint8 [N, bytes per row]");
  TORCH_CHECK(k > 0 && k % QK == 0, "in_features must be a positive multiple of 32");
  TORCH_CHECK(blocks.size(1) == k / QK * block_bytes(qtype), "blocks per row disagree with in_features");
}

at::Tensor quant_dequantize(const at::Tensor& blocks, int64_t qtype, int64_t k) {
  check(blocks, qtype, k);
  auto w = at::empty({blocks.size(0), k}, blocks.options().dtype(at::kFloat));
  dequantize_rows(blocks.data_ptr<uint8_t>(), blocks.size(1), qtype, k, 0, blocks.size(0), w.data_ptr<float>());
  return w;
}

#ifdef LORAPLEX_QUANT_AVX2
// One block's 32 weights as four vectors of 8 floats, dequantized in registers (w = d * q + m).
inline void block_vectors(const uint8_t* b, int64_t qtype, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(b)));
  if (qtype == Q8_0) {
    const uint8_t* q = b + 2;
    for (int i = 0; i < 4; ++i) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
      w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
    }
    return;
  }
  const float mf = qtype == Q4_1 ? _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b + 2))
                                 : -8.f * _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b));
  const __m256 m = _mm256_set1_ps(mf);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (qtype == Q4_1 ? 4 : 2)));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  w[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), m);
  w[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), m);
  w[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), m);
  w[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), m);
}

inline float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Rows r0..r1 of out for `R` activation rows: each block dequantized once into registers, then four
// FMAs per activation row into that row's vector accumulator.
template <int R>
void direct_rows(const float* x, int64_t x_stride, const uint8_t* blocks, int64_t row_bytes, int64_t qtype,
                 int64_t k, int64_t r0, int64_t r1, float* out, int64_t out_stride) {
  const int64_t nb = k / QK, bb = block_bytes(qtype);
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const uint8_t* row = blocks + r * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      __m256 w[4];
      block_vectors(row + b * bb, qtype, w);
      for (int i = 0; i < R; ++i) {
        const float* xi = x + i * x_stride + b * QK;
        acc[i] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xi), acc[i]);
        acc[i] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xi + 8), acc[i]);
        acc[i] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xi + 16), acc[i]);
        acc[i] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xi + 24), acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) out[i * out_stride + r] = horizontal_sum(acc[i]);
  }
}

template <int R>
void direct_fixed(const float* x, int64_t m_rows, int64_t x_stride, const uint8_t* blocks, int64_t row_bytes,
                  int64_t qtype, int64_t n, int64_t k, float* out, int64_t out_stride) {
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i0 = 0; i0 < m_rows; i0 += R) {  // R activation rows at a time (the rest: one by one)
      if (m_rows - i0 >= R)
        direct_rows<R>(x + i0 * x_stride, x_stride, blocks, row_bytes, qtype, k, r0, r1, out + i0 * out_stride,
                       out_stride);
      else
        for (int64_t i = i0; i < m_rows; ++i)
          direct_rows<1>(x + i * x_stride, x_stride, blocks, row_bytes, qtype, k, r0, r1, out + i * out_stride,
                         out_stride);
    }
  });
}
#endif

// out[m, n] for M <= DIRECT_ROWS: each weight block dequantized once, dotted with every row.
void direct(const float* x, int64_t m_rows, int64_t x_stride, const uint8_t* blocks, int64_t row_bytes,
            int64_t qtype, int64_t n, int64_t k, float* out, int64_t out_stride) {
#ifdef LORAPLEX_QUANT_AVX2
  if (m_rows >= 8)
    return direct_fixed<8>(x, m_rows, x_stride, blocks, row_bytes, qtype, n, k, out, out_stride);
  if (m_rows >= 4)
    return direct_fixed<4>(x, m_rows, x_stride, blocks, row_bytes, qtype, n, k, out, out_stride);
  return direct_fixed<1>(x, m_rows, x_stride, blocks, row_bytes, qtype, n, k, out, out_stride);
#else
  const int64_t nb = k / QK, bb = block_bytes(qtype);
  at::parallel_for(0, n, 8, [&](int64_t r0, int64_t r1) {
    alignas(64) float w[QK];
    float acc[DIRECT_ROWS];
    for (int64_t r = r0; r < r1; ++r) {
      std::fill_n(acc, m_rows, 0.f);  // the portable path (no AVX2)
      const uint8_t* row = blocks + r * row_bytes;
      for (int64_t b = 0; b < nb; ++b) {
        dequantize_block(row + b * bb, qtype, w);
        for (int64_t i = 0; i < m_rows; ++i) {
          const float* xi = x + i * x_stride + b * QK;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < QK; ++j) s += w[j] * xi[j];
          acc[i] += s;
        }
      }
      for (int64_t i = 0; i < m_rows; ++i) out[i * out_stride + r] = acc[i];
    }
  });
#endif
}

void quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, const at::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "quant_linear is float32 only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1,
              "expected x [M, K] and out [M, N], contiguous rows");
  const int64_t m = x.size(0), k = x.size(1), n = blocks.size(0);
  check(blocks, qtype, k);
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "out must be [M, N]");
  const uint8_t* B = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1);
  if (m <= DIRECT_ROWS) {
    direct(x.data_ptr<float>(), m, x.stride(0), B, row_bytes, qtype, n, k, out.data_ptr<float>(), out.stride(0));
    return;
  }
  auto tile = at::empty({std::min(n, TILE_ROWS), k}, x.options());
  for (int64_t n0 = 0; n0 < n; n0 += TILE_ROWS) {
    const int64_t rows = std::min(TILE_ROWS, n - n0);
    dequantize_rows(B, row_bytes, qtype, k, n0, n0 + rows, tile.data_ptr<float>());
    out.narrow(1, n0, rows).copy_(at::mm(x, tile.narrow(0, 0, rows).t()));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("quant_linear(Tensor x, Tensor blocks, int qtype, Tensor(a!) out) -> ()");
  m.def("quant_dequantize(Tensor blocks, int qtype, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_dequantize", &quant_dequantize);
}
