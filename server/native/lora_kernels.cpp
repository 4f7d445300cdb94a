// The CPU LoRA kernels: rank-aware batched mat-vecs over each slot's rows, float32.
//
// Built by server/native/loader.py on first use (torch's JIT extension loader, -O3 -march=native)
// and registered as torch ops `loraplex::shrink_slots` and `loraplex::expand_slots`. Rows are given
// per slot in CSR form: slot s owns packed rows rows[ptr[s] .. ptr[s+1]) (ptr [S' + 1], rows [n]).
// Each slot's weights are streamed once whatever its row count, only up to its adapter's rank
// (ranks [S] int32): the zero padding past it is never read. Slots run in parallel on torch's own
// OpenMP team (at::parallel_for), rows of one slot on one thread, so no two threads write one row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

void check_inner_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// The rows of each slot (CSR) and the slots' ranks, checked, as raw pointers.
struct SlotPlan {
  int64_t slots;
  const int64_t* ptr;
  const int64_t* rows;
  const int32_t* ranks;
};

SlotPlan slot_plan(const at::Tensor& ptr, const at::Tensor& rows, const at::Tensor& ranks) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && rows.scalar_type() == at::kLong, "ptr and rows must be int64");
  TORCH_CHECK(ranks.scalar_type() == at::kInt, "ranks must be int32");
  TORCH_CHECK(ptr.is_contiguous() && rows.is_contiguous() && ranks.is_contiguous(), "plan tensors must be contiguous");
  TORCH_CHECK(ranks.numel() >= ptr.numel() - 1, "a rank is needed for every slot of the plan");
  return {ptr.numel() - 1, ptr.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), ranks.data_ptr<int32_t>()};
}

// t[row, g*R + j] = a[s, g*R + j, :] . x[row, :] for j < ranks[s]; 0 for the other columns.
// x [N, in], a [S, members*R, in], t [N, members*R].
void shrink_slots(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ptr, const at::Tensor& rows,
                  const at::Tensor& ranks, int64_t members, const at::Tensor& t) {
  check_inner_contiguous(x, "x");
  check_inner_contiguous(a, "a");
  check_inner_contiguous(t, "t");
  const SlotPlan plan = slot_plan(ptr, rows, ranks);
  const int64_t* P = plan.ptr;
  const int64_t* Rw = plan.rows;
  const int64_t in = x.size(1), width = a.size(1), rank_max = width / members;
  TORCH_CHECK(a.size(2) == in && t.size(1) == width && width == members * rank_max, "shrink shapes disagree");
  const float* X = x.data_ptr<float>();
  const float* A = a.data_ptr<float>();
  float* T = t.data_ptr<float>();
  const int64_t xs = x.stride(0), ts = t.stride(0), as = a.stride(0), ar = a.stride(1);
  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t rank = std::min<int64_t>(plan.ranks[s], rank_max);
      for (int64_t p = P[s]; p < P[s + 1]; ++p) std::fill_n(T + Rw[p] * ts, width, 0.f);
      for (int64_t g = 0; g < members; ++g) {
        for (int64_t j = 0; j < rank; ++j) {
          const float* arow = A + s * as + (g * rank_max + j) * ar;
          for (int64_t p = P[s]; p < P[s + 1]; ++p) {
            const float* xrow = X + Rw[p] * xs;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < in; ++i) acc += arow[i] * xrow[i];
            T[Rw[p] * ts + g * rank_max + j] = acc;
          }
        }
      }
    }
  });
}

// Up to ROWS rows of one slot, one chunk of CHUNK output columns: the rows' partial outputs stay in
// registers while the slot's B rows stream past once (y[r, o] += sum_j t[r, j] * B[j, o]).
template <int ROWS, int CHUNK>
inline void expand_chunk(float* const* y, const float* const* t, const float* b, int64_t br, int64_t rank,
                         int64_t width) {
  float acc[ROWS][CHUNK];
  for (int r = 0; r < ROWS; ++r)
    for (int64_t o = 0; o < width; ++o) acc[r][o] = y[r][o];
  for (int64_t j = 0; j < rank; ++j) {
    const float* brow = b + j * br;
    for (int r = 0; r < ROWS; ++r) {
      const float c = t[r][j];
      if (width == CHUNK) {
#pragma omp simd
        for (int o = 0; o < CHUNK; ++o) acc[r][o] += c * brow[o];
      } else {
        for (int64_t o = 0; o < width; ++o) acc[r][o] += c * brow[o];
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int64_t o = 0; o < width; ++o) y[r][o] = acc[r][o];
}

template <int ROWS>
void expand_rows(float* const* y, const float* const* t, const float* b, int64_t br, int64_t rank, int64_t out) {
  constexpr int CHUNK = 64;
  for (int64_t o0 = 0; o0 < out; o0 += CHUNK) {
    float* yc[ROWS];
    for (int r = 0; r < ROWS; ++r) yc[r] = y[r] + o0;
    expand_chunk<ROWS, CHUNK>(yc, t, b + o0, br, rank, std::min<int64_t>(CHUNK, out - o0));
  }
}

// y[row, :] += sum_{j < ranks[s]} t[row, j] * b[s, :, j].  y [N, out], t [N, >= R], b [S, out, R] with
// out contiguous (b is the [S, R, out] buffer's transposed view). A slot's rows go through in groups of
// up to 4, so B is read once per group, not once per row.
void expand_slots(const at::Tensor& y, const at::Tensor& t, const at::Tensor& b, const at::Tensor& ptr,
                  const at::Tensor& rows, const at::Tensor& ranks) {
  check_inner_contiguous(y, "y");
  check_inner_contiguous(t, "t");
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.stride(1) == 1, "b must be float32 with out contiguous");
  const SlotPlan plan = slot_plan(ptr, rows, ranks);
  const int64_t* P = plan.ptr;
  const int64_t* Rw = plan.rows;
  const int64_t out = b.size(1), rank_max = b.size(2);
  TORCH_CHECK(y.size(1) == out && t.size(1) >= rank_max, "expand shapes disagree");
  float* Y = y.data_ptr<float>();
  const float* T = t.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  const int64_t ys = y.stride(0), ts = t.stride(0), bs = b.stride(0), br = b.stride(2);
  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t rank = std::min<int64_t>(plan.ranks[s], rank_max);
      if (s + 1 < s1) {  // the next slot's B, fetched while this one computes
        const float* next = B + (s + 1) * bs;
        const int64_t next_rank = std::min<int64_t>(plan.ranks[s + 1], rank_max);
        for (int64_t j = 0; j < next_rank; ++j)
          for (int64_t o = 0; o < out; o += 16) __builtin_prefetch(next + j * br + o, 0, 3);
      }
      for (int64_t p = P[s]; p < P[s + 1]; p += 4) {
        const int64_t count = std::min<int64_t>(4, P[s + 1] - p);
        float* yr[4];
        const float* tr[4];
        for (int64_t r = 0; r < count; ++r) {
          yr[r] = Y + Rw[p + r] * ys;
          tr[r] = T + Rw[p + r] * ts;
        }
        const float* bslot = B + s * bs;
        switch (count) {
          case 1: expand_rows<1>(yr, tr, bslot, br, rank, out); break;
          case 2: expand_rows<2>(yr, tr, bslot, br, rank, out); break;
          case 3: expand_rows<3>(yr, tr, bslot, br, rank, out); break;
          default: expand_rows<4>(yr, tr, bslot, br, rank, out); break;
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(loraplex, m) {
  m.def("shrink_slots(Tensor x, Tensor a, Tensor ptr, Tensor rows, Tensor ranks, int members, Tensor(a!) t) -> ()");
  m.def("expand_slots(Tensor(a!) y, Tensor t, Tensor b, Tensor ptr, Tensor rows, Tensor ranks) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("shrink_slots", &shrink_slots);
  m.impl("expand_slots", &expand_slots);
}
