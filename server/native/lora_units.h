// How the LoRA kernels cut a step's work (included by lora_kernels.cpp only): the rows of each slot in
// CSR form, units of at most UNIT_ROWS rows of one slot spread over torch's threads at equal cost, and
// the adapter pool's block offsets, checked before any thread reads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

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

}  // namespace
