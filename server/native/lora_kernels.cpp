// The CPU LoRA kernels: rank-aware batched mat-vecs over each slot's rows. Activations and sums are
// float32; the adapter weights (A, B) are float32 or bfloat16 (half the bytes to stream, widened to
// float32 as they are loaded).
//
// Built by server/native/loader.py on first use (torch's JIT extension loader, -O3 -march=native)
// and registered as torch ops `loraplex::shrink_slots` and `loraplex::expand_slots` (weights in per-slot
// buffers padded to the max rank), `loraplex::shrink_pool` and `loraplex::expand_pool` (weights in the
// adapter pool, each at its own rank), and `loraplex::lora_pool_group` (one projection group's whole
// delta on the pool: every member's shrink and expand in one call). The register tiles are in
// lora_tiles.h, the split of the work into units in lora_units.h. Rows are given per slot in CSR form: slot s owns packed rows rows[ptr[s] .. ptr[s+1]) (ptr [S' + 1], rows [n]).
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

#include "lora_tiles.h"
#include "lora_units.h"

namespace {

void check_inner_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

void check_weights(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
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
