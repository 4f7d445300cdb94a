// Paged decode attention on the CPU, float32: one query token per sequence against its cached keys
// and values, read in place from the KV pools' blocks (no gather copy, no padding to the batch's
// longest context).
//
// Registered as torch op `loraplex::paged_decode_attention` (built with lora_kernels.cpp by
// server/native/loader.py). Shapes:
//   q [n, H, D]                   the decoding sequences' queries (D contiguous), rotary applied
//   k_pool, v_pool [KVH, NB, BS, D] one layer's cache, contiguous (server/engine/kv_cache.py)
//   tables [n, W] int64           block ids of each sequence's context, in token order
//   context_lens [n] int64        tokens in cache per sequence, this step's included (<= W * BS)
//   window                        > 0: each query sees only its sequence's last `window` tokens (sliding
//                                 window, as transformers: key k visible from query q when q - k < window)
//   softcap                       > 0: scores become softcap * tanh(scores / softcap) (Gemma 2)
//   sinks [H] float32 or None     one extra logit per query head in each softmax's denominator (gpt-oss)
//   out [n, H, D]                 written: softmax(q . K^T * scale) . V over each sequence's visible context
// GQA: query head h reads kv head h / (H / KVH). Work items are (sequence, kv head) pairs on torch's
// OpenMP team (at::parallel_for); an item's H / KVH query heads share one pass over its keys and one
// over its values, so each cached byte is read once per step.
//
// Also `loraplex::rope_cache_write` (one call per layer of the lean decoder forward, server/engine/lean_forward.py):
//   q [T, H, D], k [T, KVH, D]    this step's queries and keys (D contiguous, any row stride), rotated in place
//                                 by rotary embedding: x * cos + rotate_half(x) * sin, as transformers' Llama
//   v [T, KVH, D]                 this step's values
//   cos, sin [T, D]               the rotary tables at each token's position (the model's rotary module's output)
//   slots [T] int64               each token's flat cache slot (block * BS + offset)
//   k_pool, v_pool [KVH, NB, BS, D]  one layer's cache: the rotated keys and the values written at `slots`
// and `loraplex::add_rms_norm` (the lean forward's residual add and the next RMSNorm, one call):
//   h [T, C] (a!)                 the residual stream; `delta` [T, C] (or None) is added to it in place
//   out [T, C]                    written: weight * (h * rsqrt(mean(h^2) + eps)), as transformers' Llama RMSNorm
//                                 rounds it (the mean summed in double: within an ulp of torch's float sum)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// exp(x) for x <= 0 (softmax after the max is subtracted), vectorizable: x = n ln2 + r, |r| <= ln2/2,
// exp(r) by a degree-6 polynomial (relative error < 2e-7), 2^n built in the exponent bits.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // below, exp underflows float32 anyway
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// head_dim as a compile-time constant (0: known at run time only).
template <int64_t D>
struct Dim {
  static constexpr int64_t value = D;
};

// One work item: the `group` query heads `qh` (stride qs1) of one sequence against one kv head's
// pools `kh`/`vh`, over tokens `first .. len - 1` of the blocks `table` (first > 0 under a sliding
// window); writes `o` (stride os1). `cap` > 0 softcaps the scaled scores (cap * tanh(s / cap));
// `sink` (one logit per query head of the group, or null) joins each softmax's denominator only.
// `scores [group * (len - first)]` and `acc [group * dim]` are the calling thread's scratch. Loops
// run block by block, so a block's keys (values) stay in L1 while every query head reads them.
template <typename DimT>
void attend(const float* qh, int64_t qs1, const float* kh, const float* vh, const int64_t* table, int64_t first,
            int64_t len, int64_t block, int64_t group, int64_t dim_rt, float sc, float cap, const float* sink,
            float* scores, float* acc, float* o, int64_t os1) {
  constexpr int64_t DC = DimT::value;
  const int64_t dim = DC > 0 ? DC : dim_rt;
  const int64_t span = len - first;
  const int64_t b0 = first / block, nblocks = (len + block - 1) / block;
  for (int64_t b = b0; b < nblocks; ++b) {
    const int64_t t0 = std::max(b * block, first), t1 = std::min((b + 1) * block, len);
    const float* kb = kh + table[b] * block * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qh + g * qs1;
      float* s = scores + g * span;
      for (int64_t t = t0; t < t1; ++t) {
        const float* k = kb + (t - b * block) * dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += qg[d] * k[d];
        s[t - first] = cap > 0.f ? cap * std::tanh(dot * sc / cap) : dot * sc;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * span;
    float top = sink ? sink[g] : s[0];
    for (int64_t t = 0; t < span; ++t) top = std::max(top, s[t]);
    float total = sink ? exp_nonpositive(sink[g] - top) : 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < span; ++t) {
      const float e = exp_nonpositive(s[t] - top);
      s[t] = e;
      total += e;
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t t = 0; t < span; ++t) s[t] *= inv;
  }
  std::fill_n(acc, group * dim, 0.f);
  for (int64_t b = b0; b < nblocks; ++b) {
    const int64_t t0 = std::max(b * block, first), t1 = std::min((b + 1) * block, len);
    const float* vb = vh + table[b] * block * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* p = scores + g * span;
      float* a = acc + g * dim;
      for (int64_t t = t0; t < t1; ++t) {
        const float* v = vb + (t - b * block) * dim;
        const float pt = p[t - first];
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) a[d] += pt * v[d];
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) std::copy_n(acc + g * dim, dim, o + g * os1);
}

// Multiply-adds below which a call stays on the caller's thread (about 30 us of work on one core).
constexpr int64_t INLINE_MACS = 1 << 18;

void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                            const at::Tensor& tables, const at::Tensor& context_lens, double scale,
                            int64_t window, double softcap, const std::optional<at::Tensor>& sinks,
                            const at::Tensor& out) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat &&
                  v_pool.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "paged_decode_attention is float32 only");
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "expected q/out [n, H, D] and k_pool/v_pool [KVH, NB, BS, D]");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "the KV pools must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out must be contiguous in head_dim");
  TORCH_CHECK(tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
                  tables.is_contiguous() && context_lens.is_contiguous(),
              "tables and context_lens must be contiguous int64");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_pool.size(0), num_blocks = k_pool.size(1), block = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == dim && out.sizes() == q.sizes(), "head_dim or output shape disagree");
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == n && context_lens.numel() == n, "one table row per sequence");
  TORCH_CHECK(window >= 0 && softcap >= 0, "window and softcap must be >= 0 (0: none)");
  const float* S = nullptr;
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->scalar_type() == at::kFloat && sinks->is_contiguous() && sinks->numel() == q.size(1),
                "sinks must be a contiguous float32 [H]");
    S = sinks->data_ptr<float>();
  }
  const int64_t width = tables.size(1), group = heads / kv_heads;
  const int64_t* T = tables.data_ptr<int64_t>();
  const int64_t* C = context_lens.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(C[i] >= 1 && C[i] <= width * block, "context length out of the table's range");
    for (int64_t b = 0; b < (C[i] + block - 1) / block; ++b)
      TORCH_CHECK(T[i * width + b] >= 0 && T[i * width + b] < num_blocks, "block id out of range");
    longest = std::max(longest, C[i]);
  }
  const float* Q = q.data_ptr<float>();
  const float* K = k_pool.data_ptr<float>();
  const float* V = v_pool.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t head_stride = num_blocks * block * dim;  // one kv head's pool
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);

  // Work too small to pay for waking torch's OpenMP team (a batch-1 decode over a short context) runs on
  // the calling thread: at::parallel_for runs the range inline when it is shorter than one grain.
  int64_t visible = 0;
  for (int64_t i = 0; i < n; ++i) visible += window > 0 ? std::min(C[i], window) : C[i];
  const int64_t items = n * kv_heads, grain = 2 * visible * heads * dim < INLINE_MACS ? items + 1 : 1;
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(group * longest), acc(group * dim);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t seq = item / kv_heads, h = item % kv_heads;
      const int64_t first = window > 0 ? std::max<int64_t>(0, C[seq] - window) : 0;
      const auto args = std::make_tuple(Q + seq * qs0 + h * group * qs1, qs1, K + h * head_stride,
                                        V + h * head_stride, T + seq * width, first, C[seq], block, group, dim, sc,
                                        cap, S ? S + h * group : nullptr, scores.data(), acc.data(),
                                        O + seq * os0 + h * group * os1, os1);
      if (dim == 64) std::apply(attend<Dim<64>>, args);  // a constant head_dim unrolls the inner loops
      else if (dim == 128) std::apply(attend<Dim<128>>, args);
      else std::apply(attend<Dim<0>>, args);
    }
  });
}

// One rotated head row in place: x[i] * cos[i] + r[i] * sin[i] with r = rotate_half(x) = (-x2, x1). Products and
// sum rounded one by one (no fused multiply-add), as torch's elementwise ops round them: the same floats.
__attribute__((optimize("fp-contract=off"))) void rotate_row(float* x, const float* cos, const float* sin,
                                                               int64_t dim, float* tmp) {
  const int64_t half = dim / 2;
  std::memcpy(tmp, x, dim * sizeof(float));
  for (int64_t i = 0; i < half; ++i) {
    const float a = tmp[i] * cos[i], b = -tmp[i + half] * sin[i];
    x[i] = a + b;
  }
  for (int64_t i = half; i < dim; ++i) {
    const float a = tmp[i] * cos[i], b = tmp[i - half] * sin[i];
    x[i] = a + b;
  }
}

void rope_cache_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& slots, const at::Tensor& k_pool,
                      const at::Tensor& v_pool) {
  for (const auto* t : {&q, &k, &v, &cos, &sin, &k_pool, &v_pool})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "rope_cache_write is float32 only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0),
              "expected q [T, H, D], k and v [T, KVH, D]");
  const int64_t n = q.size(0), heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  TORCH_CHECK(dim % 2 == 0 && k.size(2) == dim, "head_dim must be even and shared");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == dim, "q, k and v must be [T, heads, D] rows of whole heads");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == n && cos.size(1) == dim &&
                  cos.is_contiguous() && sin.is_contiguous(), "cos and sin must be contiguous [T, D]");
  TORCH_CHECK(k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes() && k_pool.is_contiguous() &&
                  v_pool.is_contiguous() && k_pool.size(0) == kv_heads && k_pool.size(3) == dim,
              "k_pool and v_pool must be contiguous [KVH, NB, BS, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == n,
              "slots must be contiguous int64 [T]");
  const int64_t num_slots = k_pool.size(1) * k_pool.size(2);
  const int64_t* S = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) TORCH_CHECK(S[t] >= 0 && S[t] < num_slots, "slot out of range");
  float *Q = q.data_ptr<float>(), *K = k.data_ptr<float>();
  const float *V = v.data_ptr<float>(), *C = cos.data_ptr<float>(), *Sn = sin.data_ptr<float>();
  float *KP = k_pool.data_ptr<float>(), *VP = v_pool.data_ptr<float>();
  const int64_t qs = q.stride(0), ks = k.stride(0), vs = v.stride(0), head_stride = num_slots * dim;
  const int64_t grain = std::max<int64_t>(1, 4096 / ((heads + kv_heads) * dim));
  at::parallel_for(0, n, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> tmp(dim);
    for (int64_t t = t0; t < t1; ++t) {
      const float *c = C + t * dim, *s = Sn + t * dim;
      for (int64_t h = 0; h < heads; ++h) rotate_row(Q + t * qs + h * dim, c, s, dim, tmp.data());
      for (int64_t h = 0; h < kv_heads; ++h) {
        float* key = K + t * ks + h * dim;
        rotate_row(key, c, s, dim, tmp.data());
        std::memcpy(KP + h * head_stride + S[t] * dim, key, dim * sizeof(float));
        std::memcpy(VP + h * head_stride + S[t] * dim, V + t * vs + h * dim, dim * sizeof(float));
      }
    }
  });
}

__attribute__((optimize("fp-contract=off"))) void add_rms_norm(const at::Tensor& h, const std::optional<at::Tensor>& delta,
                                                                 const at::Tensor& weight, double eps,
                                                                 const at::Tensor& out) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "add_rms_norm is float32 only");
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && out.is_contiguous() && out.sizes() == h.sizes() &&
                  weight.is_contiguous() && weight.numel() == h.size(1), "expected contiguous h/out [T, C], weight [C]");
  const int64_t n = h.size(0), c = h.size(1);
  const float* D = nullptr;
  if (delta.has_value()) {
    TORCH_CHECK(delta->scalar_type() == at::kFloat && delta->dim() == 2 && delta->size(0) == n &&
                    delta->size(1) == c && delta->stride(1) == 1, "delta must be float32 [T, C], rows contiguous");
    D = delta->data_ptr<float>();
  }
  const int64_t ds = D ? delta->stride(0) : 0;
  float* H = h.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / c), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* x = H + t * c;
      if (D)
        for (int64_t i = 0; i < c; ++i) x[i] = x[i] + D[t * ds + i];
      double sum = 0;
      for (int64_t i = 0; i < c; ++i) sum += static_cast<double>(x[i]) * x[i];
      const float variance = static_cast<float>(sum / c);
      const float r = 1.f / std::sqrt(variance + e);
      float* o = O + t * c;
      for (int64_t i = 0; i < c; ++i) {
        const float scaled = x[i] * r;
        o[i] = W[i] * scaled;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor context_lens, "
        "float scale, int window, float softcap, Tensor? sinks, Tensor(a!) out) -> ()");
  m.def("rope_cache_write(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor cos, Tensor sin, Tensor slots, "
        "Tensor(c!) k_pool, Tensor(d!) v_pool) -> ()");
  m.def("add_rms_norm(Tensor(a!) h, Tensor? delta, Tensor weight, float eps, Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rope_cache_write", &rope_cache_write);
  m.impl("add_rms_norm", &add_rms_norm);
}
