// The CPU LoRA kernels: rank-aware batched mat-vecs over each slot's rows. Activations and sums are
// float32; the adapter weights (A, B) are float32 or bfloat16 (half the bytes to stream, widened to
// float32 as they are loaded).
//
// Built by server/native/loader.py on first use (torch's JIT extension loader, -O3 -march=native)
// and registered as torch ops `loraplex::shrink_slots` and `loraplex::expand_slots` (weights in per-slot
// buffers padded to the max rank), `loraplex::shrink_pool` and `loraplex::expand_pool` (weights in the
// adapter pool, each at its own rank). Rows are given
// per slot in CSR form: slot s owns packed rows rows[ptr[s] .. ptr[s+1]) (ptr [S' + 1], rows [n]).
// Rows are decode rows (one or two per slot: each slot's weights are streamed once, from memory) and
// prefill chunks (many rows per slot: the weights stay in cache while register tiles of rows go over
// them), all in one call per weight. Only a slot's adapter's rank in that weight is read (ranks int32;
// 0 where the adapter does not target it): the zeros past it are never read. The work is cut into
// units of at most UNIT_ROWS rows of one slot, run in parallel on torch's own OpenMP team
// (at::parallel_for) in contiguous runs of equal cost; a row lies in one unit, so no two threads write
// one row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

void check_inner_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

void check_weights(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

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

// The rows of each slot (CSR) and the slots' ranks, checked, as raw pointers. `ranks` is [S'] (one
// rank per slot for every member) or [members, S'] (each member's own: 0 where the slot's adapter
// does not target it); `rank(g, s)` reads either.
struct SlotPlan {
  int64_t slots;
  const int64_t* ptr;
  const int64_t* rows;
  const int32_t* ranks;
  int64_t member_stride;  // 0 for [S'] ranks
  int64_t rank(int64_t g, int64_t s) const { return ranks[g * member_stride + s]; }
};

SlotPlan slot_plan(const at::Tensor& ptr, const at::Tensor& rows, const at::Tensor& ranks, int64_t members) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && rows.scalar_type() == at::kLong, "ptr and rows must be int64");
  TORCH_CHECK(ranks.scalar_type() == at::kInt, "ranks must be int32");
  TORCH_CHECK(ptr.is_contiguous() && rows.is_contiguous() && ranks.is_contiguous(), "plan tensors must be contiguous");
  TORCH_CHECK(ranks.dim() == 1 || (ranks.dim() == 2 && ranks.size(0) == members),
              "ranks must be [slots] or [members, slots]");
  TORCH_CHECK(ranks.size(-1) >= ptr.numel() - 1, "a rank is needed for every slot of the plan");
  return {ptr.numel() - 1, ptr.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), ranks.data_ptr<int32_t>(),
          ranks.dim() == 2 ? ranks.size(1) : 0};
}

// The largest rank the group op keeps a tile's shrink for on the stack (4 rows of it).
constexpr int64_t MAX_GROUP_RANK = 512;

// A unit of work: rows rows[p0 .. p1) of one slot (CSR positions).
struct Unit {
  int64_t slot, p0, p1;
  int64_t rows() const { return p1 - p0; }
};

// A slot's rows are cut into units this long, so that one long prompt chunk, or the 32 decode rows of a
// step that runs one adapter, spread over the threads; a unit re-reads its slot's weights, from cache.
constexpr int64_t UNIT_ROWS = 16;

std::vector<Unit> plan_units(const SlotPlan& plan) {
  std::vector<Unit> units;
  for (int64_t s = 0; s < plan.slots; ++s)
    for (int64_t p = plan.ptr[s]; p < plan.ptr[s + 1]; p += UNIT_ROWS)
      units.push_back({s, p, std::min(p + UNIT_ROWS, plan.ptr[s + 1])});
  return units;
}

// body(u) for every unit u, on torch's threads, the units cut into one contiguous run per thread of
// about equal cost(u) (weights read, times the passes over them): split by count, units of rank 0 or
// many rows in one half would leave the other thread idle.
template <typename Cost, typename Body>
void for_units(const std::vector<Unit>& units, Cost cost, Body body) {
  const int64_t n = static_cast<int64_t>(units.size());
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t u = 0; u < n; ++u) prefix[u + 1] = prefix[u] + cost(units[u]);
  const int64_t total = prefix[n];
  if (total == 0) return;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) {
      // Unit u belongs to the part its starting cost falls in.
      const int64_t lo = total * part / parts, hi = total * (part + 1) / parts;
      const int64_t first = std::lower_bound(prefix.begin(), prefix.begin() + n, lo) - prefix.begin();
      const int64_t last = std::lower_bound(prefix.begin(), prefix.begin() + n, hi) - prefix.begin();
      for (int64_t u = first; u < last; ++u) body(units[u]);
    }
  });
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

// t[row, g*R + j] = A_g,s[j, :] . x[row, :] for j < rank(g, s); 0 for the other columns. x [N, in],
// t [N, members*R]. `block(g, s)` is where A_g,s starts, its rank rows `stride` apart: a slot of the padded
// buffer a [S, members*R, in], or the adapter's extent in the pool. A unit of one or two rows (decode)
// reads A once from memory, one rank row at a time; a longer one (prefill) goes over A, in cache, in
// tiles of 4 rows by 2 rank rows.
template <typename W, typename Block>
void shrink_plan(const SlotPlan& plan, const at::Tensor& x, const at::Tensor& t, int64_t members, int64_t rank_max,
                 int64_t stride, Block block) {
  const int64_t* Rw = plan.rows;
  const int64_t in = x.size(1), width = members * rank_max;
  const float* X = x.data_ptr<float>();
  float* T = t.data_ptr<float>();
  const int64_t xs = x.stride(0), ts = t.stride(0);
  auto rank = [&](int64_t g, int64_t s) { return std::min<int64_t>(plan.rank(g, s), rank_max); };
  auto cost = [&](const Unit& u) {
    int64_t sum = 0;
    for (int64_t g = 0; g < members; ++g) sum += rank(g, u.slot);
    // A is read once per pair of decode rows, once per tile of 4 rows in a prefill unit; a unit with
    // nothing to read still zeroes its rows.
    return 1 + sum * (u.rows() <= 2 ? 1 : (u.rows() + 3) / 4);
  };
  for_units(plan_units(plan), cost, [&](const Unit& u) {
    const int64_t s = u.slot;
    for (int64_t p = u.p0; p < u.p1; ++p) std::fill_n(T + Rw[p] * ts, width, 0.f);
    const int64_t tile = u.rows() <= 2 ? 2 : 4;
    for (int64_t p = u.p0; p < u.p1; p += tile) {
      const int64_t count = std::min<int64_t>(tile, u.p1 - p);
      const float* xr[4];
      float* tr[4];
      for (int64_t r = 0; r < count; ++r) {
        xr[r] = X + Rw[p + r] * xs;
        tr[r] = T + Rw[p + r] * ts;
      }
      for (int64_t g = 0; g < members; ++g) {
        const W* ag = block(g, s);
        const int64_t rg = rank(g, s), col = g * rank_max;
        if (tile == 4) {
          with_rows(count, [&](auto rows) { shrink_tile<decltype(rows)::value>(xr, ag, stride, rg, in, tr, col); });
          continue;
        }
        for (int64_t j = 0; j < rg; ++j) {
          if (count == 2)
            dot_row<2>(xr, ag + j * stride, in, tr, col + j);
          else
            dot_row<1>(xr, ag + j * stride, in, tr, col + j);
        }
      }
    }
  });
}

template <typename W>
void shrink_typed(const at::Tensor& x, const W* A, const at::Tensor& a, const at::Tensor& ptr, const at::Tensor& rows,
                  const at::Tensor& ranks, int64_t members, const at::Tensor& t) {
  const SlotPlan plan = slot_plan(ptr, rows, ranks, members);
  const int64_t in = x.size(1), width = a.size(1), rank_max = width / members;
  TORCH_CHECK(a.size(2) == in && t.size(1) == width && width == members * rank_max, "shrink shapes disagree");
  const int64_t as = a.stride(0), ar = a.stride(1);
  shrink_plan<W>(plan, x, t, members, rank_max, ar,
                 [&](int64_t g, int64_t s) { return A + s * as + g * rank_max * ar; });
}

void shrink_slots(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ptr, const at::Tensor& rows,
                  const at::Tensor& ranks, int64_t members, const at::Tensor& t) {
  check_inner_contiguous(x, "x");
  check_weights(a, "a");
  TORCH_CHECK(a.stride(-1) == 1, "a must be contiguous in its last dimension");
  check_inner_contiguous(t, "t");
  with_weights(a, [&](auto* A) { shrink_typed(x, A, a, ptr, rows, ranks, members, t); });
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

// y[row, :] += sum_{j < rank(s)} t[row, j] * B_s[j, :]. y [N, out], t [N, >= R]. `block(s)` is where B_s
// starts, its rank rows `stride` apart: a slot of b [S, out, R] with out contiguous (the [S, R, out] buffer's
// transposed view), or the rank-major block [rank, out] in the pool. A unit's rows go through in groups of
// up to 4, so B is read once per group: rank row by rank row for decode units (up to 2 rows, B from
// memory), in register tiles for prefill units (B in cache).
template <typename W, typename Block>
void expand_plan(const SlotPlan& plan, const at::Tensor& y, const at::Tensor& t, int64_t rank_max, int64_t stride,
                 Block block) {
  const int64_t* Rw = plan.rows;
  const int64_t out = y.size(1);
  float* Y = y.data_ptr<float>();
  const float* T = t.data_ptr<float>();
  const int64_t ys = y.stride(0), ts = t.stride(0);
  auto rank = [&](int64_t s) { return std::min<int64_t>(plan.rank(0, s), rank_max); };
  auto cost = [&](const Unit& u) { return rank(u.slot) * ((u.rows() + 3) / 4); };  // B: once per 4 rows
  for_units(plan_units(plan), cost, [&](const Unit& u) {
    const W* bslot = block(u.slot);
    const int64_t rs = rank(u.slot);
    const bool tiled = u.rows() > 2;
    for (int64_t p = u.p0; p < u.p1; p += 4) {
      const int64_t count = std::min<int64_t>(4, u.p1 - p);
      float* yr[4];
      const float* tr[4];
      for (int64_t r = 0; r < count; ++r) {
        yr[r] = Y + Rw[p + r] * ys;
        tr[r] = T + Rw[p + r] * ts;
      }
      with_rows(count, [&](auto rows) {
        constexpr int R = decltype(rows)::value;
        if (tiled)
          expand_tile<R>(yr, tr, bslot, stride, rs, out);
        else
          expand_rows<R>(yr, tr, bslot, stride, rs, out);
      });
    }
  });
}

template <typename W>
void expand_typed(const at::Tensor& y, const at::Tensor& t, const W* B, const at::Tensor& b, const at::Tensor& ptr,
                  const at::Tensor& rows, const at::Tensor& ranks) {
  const SlotPlan plan = slot_plan(ptr, rows, ranks, 1);
  const int64_t out = b.size(1), rank_max = b.size(2);
  TORCH_CHECK(y.size(1) == out && t.size(1) >= rank_max, "expand shapes disagree");
  const int64_t bs = b.stride(0), br = b.stride(2);
  expand_plan<W>(plan, y, t, rank_max, br, [&](int64_t s) { return B + s * bs; });
}

void expand_slots(const at::Tensor& y, const at::Tensor& t, const at::Tensor& b, const at::Tensor& ptr,
                  const at::Tensor& rows, const at::Tensor& ranks) {
  check_inner_contiguous(y, "y");
  check_inner_contiguous(t, "t");
  check_weights(b, "b");
  TORCH_CHECK(b.stride(1) == 1, "b must have out contiguous");
  with_weights(b, [&](auto* B) { expand_typed(y, t, B, b, ptr, rows, ranks); });
}

// The pool layout (server/lora/pool.py): every adapter's weights lie in one flat tensor, each weight a
// block of `rank` rows of `row` elements (A: in features; B: rank-major, out features) at element
// base[s] + rel[g * S + s] for member g of slot s. Nothing is padded to the largest rank: a rank-4
// adapter's block is a quarter of a rank-16 one's. The offsets are checked against the pool's size
// before any thread reads.
struct PoolPlan {
  const int64_t* base;
  const int64_t* rel;
  int64_t slots_total;  // S: rel's member stride
  int64_t offset(int64_t g, int64_t s) const { return base[s] + rel[g * slots_total + s]; }
};

// `member0`: the plan's member whose ranks rel's first row goes with (a group member's own B).
PoolPlan pool_plan(const at::Tensor& pool, const at::Tensor& base, const at::Tensor& rel, const SlotPlan& plan,
                   int64_t members, int64_t row, int64_t rank_max, int64_t member0 = 0) {
  TORCH_CHECK(pool.dim() == 1 && pool.is_contiguous(), "pool must be one contiguous dimension");
  TORCH_CHECK(base.scalar_type() == at::kLong && rel.scalar_type() == at::kLong, "base and rel must be int64");
  TORCH_CHECK(base.is_contiguous() && rel.is_contiguous() && rel.dim() == 2 && rel.size(0) == members &&
              rel.size(1) == base.numel() && base.numel() >= plan.slots, "base [S] and rel [members, S] disagree");
  const PoolPlan p{base.data_ptr<int64_t>(), rel.data_ptr<int64_t>(), base.numel()};
  for (int64_t s = 0; s < plan.slots; ++s) {
    if (plan.ptr[s + 1] == plan.ptr[s]) continue;
    for (int64_t g = 0; g < members; ++g) {
      const int64_t r = std::min<int64_t>(plan.rank(member0 + g, s), rank_max);
      TORCH_CHECK(r == 0 || (p.offset(g, s) >= 0 && p.offset(g, s) + r * row <= pool.numel()),
                  "a weight block lies outside the pool");
    }
  }
  return p;
}

template <typename W>
void shrink_pool_typed(const at::Tensor& x, const W* P, const at::Tensor& pool, const at::Tensor& base,
                       const at::Tensor& rel, const at::Tensor& ptr, const at::Tensor& rows, const at::Tensor& ranks,
                       int64_t members, int64_t rank_max, const at::Tensor& t) {
  const SlotPlan plan = slot_plan(ptr, rows, ranks, members);
  const int64_t in = x.size(1);
  TORCH_CHECK(t.size(1) == members * rank_max, "shrink shapes disagree");
  const PoolPlan pp = pool_plan(pool, base, rel, plan, members, in, rank_max);
  shrink_plan<W>(plan, x, t, members, rank_max, in, [&](int64_t g, int64_t s) { return P + pp.offset(g, s); });
}

void shrink_pool(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& base, const at::Tensor& rel,
                 const at::Tensor& ptr, const at::Tensor& rows, const at::Tensor& ranks, int64_t members,
                 int64_t rank_max, const at::Tensor& t) {
  check_inner_contiguous(x, "x");
  check_weights(pool, "pool");
  check_inner_contiguous(t, "t");
  with_weights(pool, [&](auto* P) { shrink_pool_typed(x, P, pool, base, rel, ptr, rows, ranks, members, rank_max, t); });
}

// y[row, :] += sum_{j < rank(s)} t[row, j] * B_s[j, :], B_s the rank-major block [rank, out] in the pool.
template <typename W>
void expand_pool_typed(const at::Tensor& y, const at::Tensor& t, const W* P, const at::Tensor& pool,
                       const at::Tensor& base, const at::Tensor& rel, const at::Tensor& ptr, const at::Tensor& rows,
                       const at::Tensor& ranks, int64_t rank_max) {
  const SlotPlan plan = slot_plan(ptr, rows, ranks, 1);
  const int64_t out = y.size(1);
  TORCH_CHECK(t.size(1) >= rank_max, "expand shapes disagree");
  const PoolPlan pp = pool_plan(pool, base, rel, plan, 1, out, rank_max);
  expand_plan<W>(plan, y, t, rank_max, out, [&](int64_t s) { return P + pp.offset(0, s); });
}

void expand_pool(const at::Tensor& y, const at::Tensor& t, const at::Tensor& pool, const at::Tensor& base,
                 const at::Tensor& rel, const at::Tensor& ptr, const at::Tensor& rows, const at::Tensor& ranks,
                 int64_t rank_max) {
  check_inner_contiguous(y, "y");
  check_inner_contiguous(t, "t");
  check_weights(pool, "pool");
  with_weights(pool, [&](auto* P) { expand_pool_typed(y, t, P, pool, base, rel, ptr, rows, ranks, rank_max); });
}

// ys[g][row, :] += B_g,s (A_g,s x[row, :]) for every member g of a group (the projections of one input) and
// every row of slot s. Each unit's rows go through in tiles of up to 4 (2 for decode units): a tile's shrink
// for member g into a buffer on the stack, then its expand, so t never leaves L1 and the group costs one
// call instead of a shrink, a column split and an expand per member (per-call costs are most of a
// single sequence's LoRA time). The same loops as shrink_plan and expand_plan, so the same sums.
template <typename W>
void group_pool_typed(const at::Tensor& x, const std::vector<at::Tensor>& ys, const W* P, const at::Tensor& pool,
                      const at::Tensor& base, const at::Tensor& rel_a, const std::vector<at::Tensor>& rel_b,
                      const at::Tensor& ptr, const at::Tensor& rows, const at::Tensor& ranks, int64_t rank_max) {
  const int64_t members = static_cast<int64_t>(ys.size());
  TORCH_CHECK(members >= 1 && static_cast<int64_t>(rel_b.size()) == members, "one output and one B per member");
  TORCH_CHECK(rank_max >= 1 && rank_max <= MAX_GROUP_RANK, "rank_max must be 1..", MAX_GROUP_RANK);
  const SlotPlan plan = slot_plan(ptr, rows, ranks, members);
  const int64_t in = x.size(1);
  const PoolPlan pa = pool_plan(pool, base, rel_a, plan, members, in, rank_max);
  std::vector<PoolPlan> pb;
  std::vector<float*> Y;
  std::vector<int64_t> outs, ystrides;
  for (int64_t g = 0; g < members; ++g) {
    check_inner_contiguous(ys[g], "y");
    TORCH_CHECK(ys[g].dim() == 2 && ys[g].size(0) == x.size(0), "each y must be [N, out]");
    pb.push_back(pool_plan(pool, base, rel_b[g], plan, 1, ys[g].size(1), rank_max, g));
    Y.push_back(ys[g].data_ptr<float>());
    outs.push_back(ys[g].size(1));
    ystrides.push_back(ys[g].stride(0));
  }
  const float* X = x.data_ptr<float>();
  const int64_t xs = x.stride(0);
  const int64_t* Rw = plan.rows;
  auto rank = [&](int64_t g, int64_t s) { return std::min<int64_t>(plan.rank(g, s), rank_max); };
  auto cost = [&](const Unit& u) {
    int64_t sum = 0;
    for (int64_t g = 0; g < members; ++g) sum += rank(g, u.slot) * (in + outs[g]);
    return 1 + sum * (u.rows() <= 2 ? 1 : (u.rows() + 3) / 4);
  };
  for_units(plan_units(plan), cost, [&](const Unit& u) {
    const int64_t s = u.slot;
    const int64_t tile = u.rows() <= 2 ? 2 : 4;
    float tbuf[4][MAX_GROUP_RANK];
    float* tr[4] = {tbuf[0], tbuf[1], tbuf[2], tbuf[3]};
    for (int64_t p = u.p0; p < u.p1; p += tile) {
      const int64_t count = std::min<int64_t>(tile, u.p1 - p);
      const float* xr[4];
      for (int64_t r = 0; r < count; ++r) xr[r] = X + Rw[p + r] * xs;
      for (int64_t g = 0; g < members; ++g) {
        const int64_t rg = rank(g, s);
        if (rg == 0) continue;
        const W* ag = P + pa.offset(g, s);
        const W* bg = P + pb[g].offset(0, s);
        float* yr[4];
        for (int64_t r = 0; r < count; ++r) yr[r] = Y[g] + Rw[p + r] * ystrides[g];
        with_rows(count, [&](auto rows_c) {
          constexpr int R = decltype(rows_c)::value;
          if (tile == 4) {
            shrink_tile<R>(xr, ag, in, rg, in, tr, 0);
            expand_tile<R>(yr, tr, bg, outs[g], rg, outs[g]);
          } else {
            for (int64_t j = 0; j < rg; ++j) dot_row<R>(xr, ag + j * in, in, tr, j);
            expand_rows<R>(yr, tr, bg, outs[g], rg, outs[g]);
          }
        });
      }
    }
  });
}

void lora_pool_group(const at::Tensor& x, at::TensorList ys, const at::Tensor& pool, const at::Tensor& base,
                     const at::Tensor& rel_a, at::TensorList rel_b, const at::Tensor& ptr, const at::Tensor& rows,
                     const at::Tensor& ranks, int64_t rank_max) {
  check_inner_contiguous(x, "x");
  check_weights(pool, "pool");
  const std::vector<at::Tensor> outs(ys.begin(), ys.end()), rels(rel_b.begin(), rel_b.end());
  with_weights(pool, [&](auto* P) {
    group_pool_typed(x, outs, P, pool, base, rel_a, rels, ptr, rows, ranks, rank_max);
  });
}

}  // namespace

TORCH_LIBRARY(loraplex, m) {
  m.def("shrink_slots(Tensor x, Tensor a, Tensor ptr, Tensor rows, Tensor ranks, int members, Tensor(a!) t) -> ()");
  m.def("expand_slots(Tensor(a!) y, Tensor t, Tensor b, Tensor ptr, Tensor rows, Tensor ranks) -> ()");
  m.def("shrink_pool(Tensor x, Tensor pool, Tensor base, Tensor rel, Tensor ptr, Tensor rows, Tensor ranks, "
        "int members, int rank_max, Tensor(a!) t) -> ()");
  m.def("expand_pool(Tensor(a!) y, Tensor t, Tensor pool, Tensor base, Tensor rel, Tensor ptr, Tensor rows, "
        "Tensor ranks, int rank_max) -> ()");
  m.def("lora_pool_group(Tensor x, Tensor(a!)[] ys, Tensor pool, Tensor base, Tensor rel_a, Tensor[] rel_b, "
        "Tensor ptr, Tensor rows, Tensor ranks, int rank_max) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("shrink_slots", &shrink_slots);
  m.impl("expand_slots", &expand_slots);
  m.impl("shrink_pool", &shrink_pool);
  m.impl("expand_pool", &expand_pool);
  m.impl("lora_pool_group", &lora_pool_group);
}
