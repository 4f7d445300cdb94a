// Linear layers over weights kept in GGUF's quantized blocks, on the CPU, float32 activations.
//
// Registered as torch ops (built with the other kernels by server/native/loader.py):
//   loraplex::quant_linear(x [M, K] f32, blocks [N, K / block_weights * block_bytes] uint8, qtype, out [M, N] f32,
//                          int8=False)
//       out = x @ W^T, W the dequantized weight [N, K].
//       int8=False (exact): each block is dequantized in registers and multiplied with the float32 activations,
//         equal to float32 matmul over the dequantized weight up to summation order.
//       int8=True (AVX2 only; elsewhere exact): in slices of INT8_DIRECT_ROWS rows, the activations are
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
// The per-type decoders (unpack_ref in quant_formats.h, visit / k_quants for AVX2 in quant_exact.h) spell out where
// each chunk's bits lie; the int8 kernels are in quant_int8.h, the drivers and the ops here.
//
// Direct kernels (M <= DIRECT_ROWS exact, INT8_DIRECT_ROWS int8) decode each weight block once per group of up to
// 8 activation rows, in registers, and dot it with every row of the group (tiles of ROW_TILE weight rows, so a
// group's re-reads come from cache), output rows split over torch's OpenMP team (calls under MIN_THREAD_WORK
// weights per thread stay on the caller's thread: the team's start and join cost more). The int8 kernels sum
// integer products as far as the scales allow: the k-quants' sub-block scales multiply 16-bit pair sums inside
// the integer dot product, so a super-block costs one conversion and one multiply-add per row; the 32-weight
// types reduce eight blocks' integer sums to one vector first. Larger M dequantizes tiles of TILE_ROWS weight rows
// and multiplies them with at::mm, a dense GEMM (AVX-512 where the CPU has it): faster than exact direct rows
// above 32-48 rows; int8 direct rows stay ahead of it at every M (256 and 512 rows of a 1B model's Q4_K and Q6_K
// linears: 1.4-1.7x), so int8 calls above INT8_DIRECT_ROWS run in slices of it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LORAPLEX_QUANT_AVX2 1
#endif

#include "quant_formats.h"
#include "quant_exact.h"
#include "quant_int8.h"
#include "quant_lanes.h"

namespace {

#ifdef LORAPLEX_QUANT_AVX2
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
  // Lane layouts: two weight rows per pass when groups of 8 activation rows outgrow L1 (the 1B model's 8192-long
  // down rows) and weight tiles are re-read from cache by several groups: each activation load then feeds two
  // rows (at one group, the weights' stream from memory is the limit and one row per pass is faster).
  bool pairs;

  template <int R>
  void rows(int64_t i0, int64_t t0, int64_t t1) const {
    const Int8Rows xr{x.q + i0 * x.k, x.d + i0 * (x.k / x.group), x.sums + i0 * (x.k / x.span), x.k, x.group, x.span};
    if constexpr (block_weights(T) == CHUNK)
      int8_rows_small<T, R>(xr, blocks, row_bytes, x.k, t0, t1, out + i0 * out_stride, out_stride);
#ifdef LORAPLEX_QUANT_LANES
    else if constexpr (is_lanes(T)) {
      if constexpr (R == 8) {
        if (pairs) return int8_rows_lanes_pairs<T, R>(xr, blocks, row_bytes, x.k, t0, t1, out + i0 * out_stride, out_stride);
      }
      int8_rows_lanes<T, R>(xr, blocks, row_bytes, x.k, t0, t1, out + i0 * out_stride, out_stride);
    }
#endif
    else
      int8_rows_k<T, R>(xr, blocks, row_bytes, x.k, t0, t1, out + i0 * out_stride, out_stride);
  }
};

#ifdef LORAPLEX_QUANT_LANES
template <int64_t T>
struct ExactLanesRun {
  static_assert(is_lanes(T));
  const float* x;  // [M, K] in lane order
  int64_t k;
  const uint8_t* blocks;
  int64_t row_bytes;
  float* out;
  int64_t out_stride;

  template <int R>
  void rows(int64_t i0, int64_t t0, int64_t t1) const {
    exact_rows_lanes<T, R>(x + i0 * k, k, blocks, row_bytes, t0, t1, out + i0 * out_stride, out_stride);
  }
};
#endif

template <int64_t T>
void direct_avx(const float* x, int64_t m_rows, int64_t x_stride, const uint8_t* blocks, int64_t row_bytes, int64_t n,
                int64_t k, float* out, int64_t out_stride, bool int8) {
  if (!int8) {
#ifdef LORAPLEX_QUANT_LANES
    if constexpr (is_lanes(T)) {
      auto ordered = at::empty({m_rows * k}, at::kFloat);
      permute_lanes_float<T>(x, m_rows, x_stride, k, ordered.data_ptr<float>());
      return over_tiles(m_rows, n, k, ExactLanesRun<T>{ordered.data_ptr<float>(), k, blocks, row_bytes, out, out_stride});
    }
#endif
    if constexpr (!is_lanes(T)) return over_tiles(m_rows, n, k, ExactRun<T>{x, x_stride, blocks, row_bytes, k, out, out_stride});
  }
  // Exact sums of x per sub-block's offset: 32 for the 32-weight types and Q4_K_L, 16 for the other k-quants.
  constexpr int64_t group = block_weights(T), span = group == CHUNK || T == Q4_K_L ? CHUNK : 16;
  const int64_t nd = m_rows * k / group, ns = m_rows * k / span;
  auto q = at::empty({m_rows * k}, at::kChar);
  auto floats = at::empty({nd + ns}, at::kFloat);
  float* d = floats.data_ptr<float>();
  float* sums = d + nd;
  const Int8Rows xr{q.data_ptr<int8_t>(), d, sums, k, group, span};
  quantize_activations(x, m_rows, x_stride, xr);
#ifdef LORAPLEX_QUANT_LANES
  if constexpr (is_lanes(T)) permute_lanes<T>(xr, m_rows);
#endif
  const bool pairs = m_rows >= 16 && 8 * k > L1_ACTIVATION_BYTES;
  over_tiles(m_rows, n, k, Int8Run<T>{xr, blocks, row_bytes, out, out_stride, pairs});
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
#ifdef LORAPLEX_QUANT_LANES
  if (t == Q4_K_L) return direct_avx<Q4_K_L>(x, m_rows, x_stride, blocks, row_bytes, n, k, out, out_stride, int8);
  if (t == Q6_K_L) return direct_avx<Q6_K_L>(x, m_rows, x_stride, blocks, row_bytes, n, k, out, out_stride, int8);
#endif
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

// Whether the int8 mode's kernels exist in this build (else int8 calls run exact).
bool int8_kernels(bool int8) {
#ifdef LORAPLEX_QUANT_AVX2
  return int8;
#else
  (void)int8;
  return false;
#endif
}

// The most rows one direct call takes; above, exact calls dequantize tiles for at::mm, int8 ones take slices.
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
  const int64_t most = direct_rows(int8);
  // int8: direct at every M, in slices (faster than tiles + at::mm); the lane layouts: no vector tile decoder
  if (m <= most || int8_kernels(int8) || is_lanes(qtype)) {
    for (int64_t i0 = 0; i0 < m; i0 += most)
      direct(x.data_ptr<float>() + i0 * x.stride(0), std::min(most, m - i0), x.stride(0), B, row_bytes, qtype, n, k,
             out.data_ptr<float>() + i0 * out.stride(0), out.stride(0), int8);
    return;
  }
  auto tile = at::empty({std::min(n, TILE_ROWS), k}, x.options());
  for (int64_t n0 = 0; n0 < n; n0 += TILE_ROWS) {
    const int64_t rows = std::min(TILE_ROWS, n - n0);
    dequantize_rows(B, row_bytes, qtype, k, n0, n0 + rows, tile.data_ptr<float>(), false);
    out.narrow(1, n0, rows).copy_(at::mm(x, tile.narrow(0, 0, rows).t()));
  }
}

// (blocks, qtype) in the layout the int8 mode computes fastest on this build: Q4_K and Q6_K in their lane layouts
// where the VNNI kernel exists, everything else unchanged (the same tensor).
std::tuple<at::Tensor, int64_t> quant_int8_layout(const at::Tensor& blocks, int64_t qtype, int64_t k) {
  check(blocks, qtype, k);
#ifdef LORAPLEX_QUANT_LANES
  if (qtype == Q4_K || qtype == Q6_K) {
    const int64_t lanes = qtype + 100, nb = k / 256, from = block_bytes(qtype), to = block_bytes(lanes);
    auto out = at::empty({blocks.size(0), nb * to}, blocks.options());
    const uint8_t* src = blocks.data_ptr<uint8_t>();
    uint8_t* dst = out.data_ptr<uint8_t>();
    at::parallel_for(0, blocks.size(0) * nb, 1024, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        (qtype == Q4_K ? to_lanes<Q4_K_L> : to_lanes<Q6_K_L>)(src + b * from, dst + b * to);
    });
    return {out, lanes};
  }
#endif
  return {blocks, qtype};
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
  m.def("quant_int8_layout(Tensor blocks, int qtype, int in_features) -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_linear_forward", &quant_linear_forward);
  m.impl("quant_dequantize", &quant_dequantize);
  m.impl("quant_int8_layout", &quant_int8_layout);
}
