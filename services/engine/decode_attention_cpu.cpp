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
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// dot(a, b) and acc += w * v over D floats, D a multiple of the vector width where it is
// one (64 and 128 are), element by element otherwise.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
inline float dot(const float* a, const float* b, int64_t n) {
  if (n % kLanes) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
  __m512 s = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += kLanes)
    s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s);
  return _mm512_reduce_add_ps(s);
}
inline void axpy(float* acc, float w, const float* v, int64_t n) {
  if (n % kLanes) {
    for (int64_t i = 0; i < n; ++i) acc[i] += w * v[i];
    return;
  }
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t i = 0; i < n; i += kLanes)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(acc + i)));
}
#else
constexpr int kLanes = 8;
inline float dot(const float* a, const float* b, int64_t n) {
  if (n % kLanes) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
  __m256 s = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += kLanes)
    s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
inline void axpy(float* acc, float w, const float* v, int64_t n) {
  if (n % kLanes) {
    for (int64_t i = 0; i < n; ++i) acc[i] += w * v[i];
    return;
  }
  const __m256 wv = _mm256_set1_ps(w);
  for (int64_t i = 0; i < n; i += kLanes)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
}
#endif

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
  // a task: one sequence, all its heads, its context read block by block in memory order (a
  // block's slots hold every KV head side by side: a cold cache streams it, where reading one
  // head at a time strides through it three or more times)
  at::parallel_for(0, b_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(h_n * longest);
    std::vector<float> acc(h_n * d_n);
    std::vector<float> mx(h_n);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lp[b];
      const float* qb = qp + b * h_n * d_n;
      const int64_t* row = tp + b * nblk;
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const float* kb = kp + row[t0 / block_size] * block_size * hkv * d_n;
        for (int64_t j = 0, n = std::min(block_size, len - t0); j < n; ++j) {
          for (int64_t h = 0; h < h_n; ++h) {
            const float s = dot(qb + h * d_n, kb + (j * hkv + h / group) * d_n, d_n) * sc;
            p[h * longest + t0 + j] = s;
            mx[h] = std::max(mx[h], s);
          }
        }
      }
      float* o = op + b * h_n * d_n;
      for (int64_t h = 0; h < h_n; ++h) {
        float* ph = p.data() + h * longest;
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          ph[t] = std::exp(ph[t] - mx[h]);
          sum += ph[t];
        }
        mx[h] = 1.f / sum;  // now the normalizer
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const float* vb = vp + row[t0 / block_size] * block_size * hkv * d_n;
        for (int64_t j = 0, n = std::min(block_size, len - t0); j < n; ++j)
          for (int64_t h = 0; h < h_n; ++h)
            axpy(acc.data() + h * d_n, p[h * longest + t0 + j], vb + (j * hkv + h / group) * d_n,
                 d_n);
      }
      for (int64_t h = 0; h < h_n; ++h)
        for (int64_t d = 0; d < d_n; ++d) o[h * d_n + d] = acc[h * d_n + d] * mx[h];
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
