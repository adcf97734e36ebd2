// Decode attention on the CPU straight over the paged KV cache: each decode sequence's one
// query against its context, read slot by slot through its block table, softmax in float32
// with the maximum subtracted (the same arithmetic as SDPA's, summed in another order). What
// it replaces per layer: gathering every context block into a padded copy, a padding mask and
// SDPA's call, ~100 us of small ops a layer at one row that a step of a small model notices.
//
// q [B, H, D] float32; k_cache, v_cache [slots, Hkv, D]; table int64 [B, nblk]; lens int64 [B]
// (each sequence's context, its new token's K/V already written); out [B, H, D].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& table,
                            const at::Tensor& lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q: float32 [B, H, D]");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.scalar_type() == at::kFloat &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kFloat,
              "k_cache, v_cache: float32 [slots, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: contiguous");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 &&
                  lens.scalar_type() == at::kLong && lens.dim() == 1,
              "table: int64 [B, nblk], lens: int64 [B]");
  const int64_t b_n = q.size(0), h_n = q.size(1), d_n = q.size(2);
  const int64_t hkv = k_cache.size(1), slots = k_cache.size(0);
  TORCH_CHECK(k_cache.size(2) == d_n && h_n % hkv == 0, "heads: H a multiple of Hkv, same D");
  TORCH_CHECK(table.size(0) == b_n && lens.size(0) == b_n, "one table row and length a query");
  const auto qc = q.contiguous();
  const auto tc = table.contiguous();
  const auto lc = lens.contiguous();
  const int64_t nblk = tc.size(1);
  const int64_t* tp = tc.data_ptr<int64_t>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < b_n; ++b) {
    TORCH_CHECK(lp[b] > 0 && lp[b] <= nblk * block_size, "a context length outside its table");
    longest = std::max(longest, lp[b]);
  }
  for (int64_t i = 0; i < b_n * nblk; ++i)
    TORCH_CHECK(tp[i] >= 0 && (tp[i] + 1) * block_size <= slots, "a block outside the cache");
  auto out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = h_n / hkv;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, b_n * h_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(longest);
    std::vector<float> acc(d_n);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / h_n, h = i % h_n, hk = h / group, len = lp[b];
      const float* qv = qp + i * d_n;
      const int64_t* row = tp + b * nblk;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = row[t / block_size] * block_size + t % block_size;
        p[t] = dot(qv, kp + (slot * hkv + hk) * d_n, d_n) * sc;
        mx = std::max(mx, p[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < len; ++t) {
        p[t] = std::exp(p[t] - mx);
        sum += p[t];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = row[t / block_size] * block_size + t % block_size;
        const float* v = vp + (slot * hkv + hk) * d_n;
        const float w = p[t];
#pragma omp simd
        for (int64_t d = 0; d < d_n; ++d) acc[d] += w * v[d];
      }
      float* o = op + i * d_n;
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < d_n; ++d) o[d] = acc[d] * inv;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, lib) {
  lib.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor table, Tensor lens, "
      "int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, lib) { lib.impl("decode_attention", decode_attention); }
