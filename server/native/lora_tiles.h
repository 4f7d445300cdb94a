// The LoRA kernels' register tiles (included by lora_kernels.cpp only): float32 vectors of VL lanes,
// bfloat16 weights widened as they load, and the dot products and updates of one slot's rows against
// its A and B: decode forms that stream the weights once from memory, prefill forms over weights in cache.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// 16 floats: GCC's vector extensions lower it to one AVX-512 register or two AVX2 ones (the
// portable build), with no intrinsics to keep per instruction set; plain loops over short arrays
// came out as a mix of 128- and 256-bit code with stack round trips.
constexpr int VL = 16;
typedef float vfloat __attribute__((vector_size(VL * sizeof(float))));
typedef uint32_t vuint __attribute__((vector_size(VL * sizeof(uint32_t))));
typedef uint16_t vhalf __attribute__((vector_size(VL * sizeof(uint16_t))));

// A weight as float32: bfloat16 is the top half of a float32, so widening is a 16-bit shift.
inline float widen(float w) { return w; }
inline float widen(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// VL consecutive values as float32 (unaligned loads).
inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vfloat load(const uint16_t* p) {
  vhalf h;
  std::memcpy(&h, p, sizeof h);
  const vuint bits = __builtin_convertvector(h, vuint) << 16;
  vfloat v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// The sum of a vector's lanes, as a tree of halves.
inline float lane_sum(vfloat v) {
  typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
  typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
  const v8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// Calls body(W*) with the weights' data as float (float32) or uint16_t (bfloat16 bits).
template <typename Body>
void with_weights(const at::Tensor& w, Body&& body) {
  if (w.scalar_type() == at::kBFloat16)
    body(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  else
    body(w.data_ptr<float>());
}

// Calls f(std::integral_constant<int, R>) for R = n in 1..4 (a tile's row count as a template argument).
template <typename F>
void with_rows(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// t[r][col] = a[:] . x[r, :] for ROWS rows: UNROLL independent vector sums per row, so the FMAs do
// not wait on each other's latency (one running sum per dot product was latency-bound), and each A
// vector is loaded once for all the rows. A is read in order: reading several rank rows at once
// was slower from memory.
template <int ROWS, typename W>
inline void dot_row(const float* const* x, const W* a, int64_t in, float* const* t, int64_t col) {
  constexpr int UNROLL = 2;  // 4 was 6% slower from memory in float32, and no faster in bfloat16
  vfloat acc[ROWS][UNROLL] = {};
  int64_t i = 0;
  for (; i + UNROLL * VL <= in; i += UNROLL * VL) {
    for (int u = 0; u < UNROLL; ++u) {
      const vfloat w = load(a + i + u * VL);
      for (int r = 0; r < ROWS; ++r) acc[r][u] += w * load(x[r] + i + u * VL);
    }
  }
  for (; i + VL <= in; i += VL) {
    const vfloat w = load(a + i);
    for (int r = 0; r < ROWS; ++r) acc[r][0] += w * load(x[r] + i);
  }
  for (int r = 0; r < ROWS; ++r) {
    float sum = lane_sum(acc[r][0] + acc[r][1]);
    for (int64_t ii = i; ii < in; ++ii) sum += widen(a[ii]) * x[r][ii];
    t[r][col] = sum;
  }
}

// The prefill form: t[r][col + c] = A[c, :] . x[r, :] for ROWS rows and COLS rank rows of A (`astride`
// apart), ROWS * COLS independent sums. A is in cache (a unit's rows go over it in tiles), so each
// vector of x serves COLS rank rows and each vector of A serves ROWS rows: 4 x 4 tiles do 16 FMAs per 8
// loads, where the decode form's one rank row at a time does 2 per 3.
template <int ROWS, int COLS, typename W>
inline void dot_tile(const float* const* x, const W* a, int64_t astride, int64_t in, float* const* t, int64_t col) {
  vfloat acc[ROWS][COLS] = {};
  int64_t i = 0;
  for (; i + VL <= in; i += VL) {
    vfloat w[COLS];
    for (int c = 0; c < COLS; ++c) w[c] = load(a + c * astride + i);
    for (int r = 0; r < ROWS; ++r) {
      const vfloat xv = load(x[r] + i);
      for (int c = 0; c < COLS; ++c) acc[r][c] += w[c] * xv;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < COLS; ++c) {
      float sum = lane_sum(acc[r][c]);
      for (int64_t ii = i; ii < in; ++ii) sum += widen(a[c * astride + ii]) * x[r][ii];
      t[r][col + c] = sum;
    }
  }
}

// One tile of up to 4 rows over every rank row of A_g (`rg` of them, `stride` apart), 4 rank rows at a time
// (16 sums, 8 loads per 16 FMAs), then the last 2 and 1.
template <int ROWS, typename W>
inline void shrink_tile(const float* const* x, const W* ag, int64_t stride, int64_t rg, int64_t in, float* const* t,
                        int64_t col) {
  int64_t j = 0;
  for (; j + 4 <= rg; j += 4) dot_tile<ROWS, 4>(x, ag + j * stride, stride, in, t, col + j);
  if (j + 2 <= rg) {
    dot_tile<ROWS, 2>(x, ag + j * stride, stride, in, t, col + j);
    j += 2;
  }
  if (j < rg) dot_tile<ROWS, 1>(x, ag + j * stride, stride, in, t, col + j);
}

// Up to ROWS rows of one slot: y[r, :] += t[r, j] * B[j, :] for each rank row j in turn, so B is
// read once, in order, and the rows' outputs stay in L1 between rank rows.
template <int ROWS, typename W>
void expand_rows(float* const* y, const float* const* t, const W* b, int64_t br, int64_t rank, int64_t out) {
  for (int64_t j = 0; j < rank; ++j) {
    const W* brow = b + j * br;
    float c[ROWS];
    for (int r = 0; r < ROWS; ++r) c[r] = t[r][j];
    int64_t o = 0;
    for (; o + VL <= out; o += VL) {
      const vfloat w = load(brow + o);
      for (int r = 0; r < ROWS; ++r) store(y[r] + o, load(y[r] + o) + c[r] * w);
    }
    for (; o < out; ++o) {
      const float w = widen(brow[o]);
      for (int r = 0; r < ROWS; ++r) y[r][o] += c[r] * w;
    }
  }
}

// The prefill form: up to ROWS rows' outputs, 4 vectors wide, stay in registers across the whole rank
// (B, in cache, is read down a column of vectors), so each y vector is loaded and stored once instead
// of once per rank row. From memory (decode) this was slower than expand_rows; from cache, twice as fast.
template <int ROWS, int VECS, typename W>
inline void expand_cols(float* const* y, const float* const* t, const W* b, int64_t br, int64_t rank, int64_t o) {
  vfloat acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = load(y[r] + o + v * VL);
  for (int64_t j = 0; j < rank; ++j) {
    vfloat w[VECS];
    for (int v = 0; v < VECS; ++v) w[v] = load(b + j * br + o + v * VL);
    for (int r = 0; r < ROWS; ++r) {
      const float c = t[r][j];
      for (int v = 0; v < VECS; ++v) acc[r][v] += c * w[v];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) store(y[r] + o + v * VL, acc[r][v]);
}

template <int ROWS, typename W>
void expand_tile(float* const* y, const float* const* t, const W* b, int64_t br, int64_t rank, int64_t out) {
  int64_t o = 0;
  for (; o + 4 * VL <= out; o += 4 * VL) expand_cols<ROWS, 4>(y, t, b, br, rank, o);
  for (; o + VL <= out; o += VL) expand_cols<ROWS, 1>(y, t, b, br, rank, o);
  for (; o < out; ++o) {  // the last columns
    for (int r = 0; r < ROWS; ++r) {
      float sum = y[r][o];
      for (int64_t j = 0; j < rank; ++j) sum += t[r][j] * widen(b[j * br + o]);
      y[r][o] = sum;
    }
  }
}

}  // namespace
