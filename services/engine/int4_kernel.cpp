// y = x W^T for W held as 4-bit integers in groups of 32 (w = d q + m, q in 0..15, d and m
// float16 per group: GGUF's Q4_0 / Q4_1 blocks, and each plane of a Q8_0 matrix), with x
// quantized per group of 32 to int16 on the way in. The products are integer dot products
// (AVX-512 VNNI's vpdpbusd; on AVX2 machines, vpmaddubsw and vpmaddwd): the weights are never
// expanded to float, so a step streams them at memory speed instead of converting them.
//
// int16, not llama.cpp's int8: with int8, one outlier in a group leaves the rest of it a few
// levels, and SmolLM2 no longer knew the capital of France. An int16 x is split into a signed
// high byte h and an unsigned low byte l (x = 256 h + l), and q . x = 256 (q . h) + (l . q):
// two byte dot products (both instructions take unsigned x signed bytes, and q fits either),
// so the 4-bit weights are unpacked only to bytes.
//
// Layout of W (the loader's job, int4_weight.py): packed uint8 [N, K/2] in GGUF's own block
// order (byte j of a group: element j in its low nibble, j + 16 in its high one); d, m
// float16 [N, K/32]. K % 64 == 0.

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

constexpr int kGroup = 32;
constexpr int kRowsAtOnce = 8;  // rows of x sharing one pass over W
constexpr int kAhead = 4;  // rows of W fetched ahead

// x's groups as the kernel reads them, each row in chunks of 4 groups (a last part-chunk
// filled out with zero groups). A chunk's bytes (h, then l) are the 64 low halves (elements
// 0..15 of each group), then the 64 high halves. f: each group's scale dx, 4 lanes each (a
// chunk's 16 floats line up with the lanes of its dot products); xs: dx * the sum of the
// group's int16 values (for the m term).
struct QuantX {
  int64_t stride;  // elements a row: chunks * 128
  std::vector<int8_t> h;
  std::vector<uint8_t> l;
  std::vector<float> f;
  std::vector<float> xs;
};

QuantX quantize_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t groups = k / kGroup, padded = (groups + 3) / 4 * 4;
  QuantX out{padded * kGroup, std::vector<int8_t>(rows * padded * kGroup),
             std::vector<uint8_t>(rows * padded * kGroup), std::vector<float>(rows * padded * 4),
             std::vector<float>(rows * padded)};
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    for (int64_t g = 0; g < groups; ++g) {
      float amax = 0.f;
      bool finite = true;
      for (int j = 0; j < kGroup; ++j) {
        amax = std::max(amax, std::fabs(xr[g * kGroup + j]));
        finite = finite && std::isfinite(xr[g * kGroup + j]);
      }
      // a NaN or infinity in x gives NaN out, as a float product would (never int garbage)
      const float d = finite ? amax / 32767.f : std::numeric_limits<float>::quiet_NaN();
      const float inv = finite && d > 0.f ? 1.f / d : 0.f;
      const int64_t lo = r * out.stride + (g / 4) * 128 + (g % 4) * 16, hi = lo + 64;
      int64_t sum = 0;
      for (int j = 0; j < 32; ++j) {
        const int v = static_cast<int>(std::nearbyint(xr[g * kGroup + j] * inv));
        const int64_t at = j < 16 ? lo + j : hi + j - 16;
        out.h[at] = static_cast<int8_t>(v >> 8);  // arithmetic: v = 256 h + l, l in 0..255
        out.l[at] = static_cast<uint8_t>(v & 0xFF);
        sum += v;
      }
      for (int j = 0; j < 4; ++j) out.f[(r * padded + g) * 4 + j] = d;
      out.xs[r * padded + g] = d * static_cast<float>(sum);
    }
  }
  return out;
}

inline float hsum(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps(v, v, 1)));
}

// Rows are short (a few cache lines): the row kAhead rows on is fetched ahead of the stream.
inline void fetch_ahead(const uint8_t* wn, const uint16_t* dn, const uint16_t* mn, int64_t k) {
  const char* next = reinterpret_cast<const char*>(wn + kAhead * (k / 2));
  for (int64_t b = 0; b < k / 2; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(dn + kAhead * (k / kGroup)), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(mn + kAhead * (k / kGroup)), _MM_HINT_T0);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// 256 (q . h) + (l . q), 4 products a lane, for 512 bits of unpacked q (lo, hi halves).
inline __m512i dot16(__m512i lo, __m512i hi, const int8_t* h, const uint8_t* l) {
  __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(h));
  a = _mm512_dpbusd_epi32(a, hi, _mm512_loadu_si512(h + 64));
  __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(l), lo);
  b = _mm512_dpbusd_epi32(b, _mm512_loadu_si512(l + 64), hi);
  return _mm512_add_epi32(_mm512_slli_epi32(a, 8), b);
}

// Rows [n0, n1) of W against MB rows of x from x_row0. A row's last part-chunk reads past
// the row (into the next, or the slack after the last): x's zero groups cancel it.
template <int MB>
void rows_block(const uint8_t* w, const at::Half* d, const at::Half* m, const QuantX& qx,
                int64_t x_row0, int64_t k, int64_t n0, int64_t n1, float* y, int64_t n_total) {
  const int64_t groups = k / kGroup;
  const int64_t chunks = (groups + 3) / 4, padded = chunks * 4;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i lane_group = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wn = w + n * (k / 2);
    const uint16_t* dn = reinterpret_cast<const uint16_t*>(d + n * groups);
    const uint16_t* mn = reinterpret_cast<const uint16_t*>(m + n * groups);
    if (n + kAhead < n1) fetch_ahead(wn, dn, mn, k);
    __m512 acc[MB];
    __m128 macc[MB];  // the m * xs terms, 4 groups a lane
    for (int r = 0; r < MB; ++r) {
      acc[r] = _mm512_setzero_ps();
      macc[r] = _mm_setzero_ps();
    }
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i packed = _mm512_loadu_si512(wn + c * 64);
      const __m512i lo = _mm512_and_si512(packed, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
      const __m512 d16 = _mm512_permutexvar_ps(
          lane_group, _mm512_castps128_ps512(_mm_cvtph_ps(
                          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(dn + c * 4)))));
      const __m128 m4 =
          _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + c * 4)));
      for (int r = 0; r < MB; ++r) {
        const int64_t xr = x_row0 + r, at = xr * qx.stride + c * 128;
        const __m512i s = dot16(lo, hi, qx.h.data() + at, qx.l.data() + at);
        const __m512 f = _mm512_loadu_ps(qx.f.data() + (xr * padded + c * 4) * 4);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d16, f), acc[r]);
        macc[r] = _mm_fmadd_ps(m4, _mm_loadu_ps(qx.xs.data() + xr * padded + c * 4), macc[r]);
      }
    }
    for (int r = 0; r < MB; ++r)
      y[(x_row0 + r) * n_total + n] = hsum(acc[r]) + hsum(macc[r]);
  }
}

#else  // AVX2, FMA and F16C: the same sums, 256 bits at a time

inline float hsum(__m256 v) {
  return hsum(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 256 (q . h) + (l . q) for 256 bits of unpacked q (two groups' lo and hi halves), 4 products
// a lane. vpmaddubsw's 16-bit pair sums cannot saturate here: 2 * 15 * 128 and 2 * 255 * 15,
// and two of them added, stay under 32767.
inline __m256i dot16(__m256i lo, __m256i hi, const int8_t* h, const uint8_t* l) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i a = _mm256_madd_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(lo, load256(h)), _mm256_maddubs_epi16(hi, load256(h + 64))),
      ones);
  const __m256i b = _mm256_madd_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(load256(l), lo), _mm256_maddubs_epi16(load256(l + 64), hi)),
      ones);
  return _mm256_add_epi32(_mm256_slli_epi32(a, 8), b);
}

template <int MB>
void rows_block(const uint8_t* w, const at::Half* d, const at::Half* m, const QuantX& qx,
                int64_t x_row0, int64_t k, int64_t n0, int64_t n1, float* y, int64_t n_total) {
  const int64_t groups = k / kGroup;
  const int64_t chunks = (groups + 3) / 4, padded = chunks * 4;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i first2 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i last2 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wn = w + n * (k / 2);
    const uint16_t* dn = reinterpret_cast<const uint16_t*>(d + n * groups);
    const uint16_t* mn = reinterpret_cast<const uint16_t*>(m + n * groups);
    if (n + kAhead < n1) fetch_ahead(wn, dn, mn, k);
    __m256 acc[MB];
    __m128 macc[MB];
    for (int r = 0; r < MB; ++r) {
      acc[r] = _mm256_setzero_ps();
      macc[r] = _mm_setzero_ps();
    }
    for (int64_t c = 0; c < chunks; ++c) {
      // a chunk's 4 groups as two halves of 2: bytes 0..31 hold groups 0 and 1
      const __m256i p0 = load256(wn + c * 64), p1 = load256(wn + c * 64 + 32);
      const __m256i lo0 = _mm256_and_si256(p0, low4);
      const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(p0, 4), low4);
      const __m256i lo1 = _mm256_and_si256(p1, low4);
      const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(p1, 4), low4);
      const __m128 d4 =
          _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(dn + c * 4)));
      const __m256 d0 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d4), first2);
      const __m256 d1 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d4), last2);
      const __m128 m4 =
          _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + c * 4)));
      for (int r = 0; r < MB; ++r) {
        const int64_t xr = x_row0 + r, at = xr * qx.stride + c * 128;
        const int8_t* h = qx.h.data() + at;
        const uint8_t* l = qx.l.data() + at;
        const float* f = qx.f.data() + (xr * padded + c * 4) * 4;
        const __m256i s0 = dot16(lo0, hi0, h, l), s1 = dot16(lo1, hi1, h + 32, l + 32);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d0, _mm256_loadu_ps(f)),
                                 acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1),
                                 _mm256_mul_ps(d1, _mm256_loadu_ps(f + 8)), acc[r]);
        macc[r] = _mm_fmadd_ps(m4, _mm_loadu_ps(qx.xs.data() + xr * padded + c * 4), macc[r]);
      }
    }
    for (int r = 0; r < MB; ++r)
      y[(x_row0 + r) * n_total + n] = hsum(acc[r]) + hsum(macc[r]);
  }
}

#endif

template <int MB>
void run_rows(const uint8_t* w, const at::Half* d, const at::Half* m, const QuantX& qx,
              int64_t x_row0, int64_t k, int64_t n, float* y) {
  // 16 rows a task: few enough tasks for a one-row step to split evenly over a few threads
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    rows_block<MB>(w, d, m, qx, x_row0, k, b, e, y, n);
  });
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d,
                       const at::Tensor& m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x: float32 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "packed: uint8 [N, K/2]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf, "d, m: float16");
  const int64_t rows = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(k % 64 == 0 && packed.size(1) == k / 2, "K must be a multiple of 64");
  TORCH_CHECK(d.size(0) == n && d.size(1) == k / kGroup && m.sizes() == d.sizes(),
              "d, m: [N, K/32]");
  TORCH_CHECK(packed.is_contiguous() && d.is_contiguous() && m.is_contiguous(),
              "packed, d, m: contiguous");
  // a row's last part-chunk reads up to 2 groups past the end: the storage must go on
  auto slack = [](const at::Tensor& t, int64_t bytes) {
    return static_cast<int64_t>(t.storage().nbytes()) >=
           (t.storage_offset() + t.numel()) * t.element_size() + bytes;
  };
  TORCH_CHECK((k / kGroup) % 4 == 0 ||
                  (slack(packed, 32) && slack(d, 4) && slack(m, 4)),
              "packed, d, m: their storage must extend 2 groups past the last row");
  auto xc = x.contiguous();
  const auto& pc = packed;
  const auto& dc = d;
  const auto& mc = m;
  const QuantX qx = quantize_rows(xc.data_ptr<float>(), rows, k);
  auto y = at::empty({rows, n}, x.options());
  const uint8_t* w = pc.data_ptr<uint8_t>();
  const at::Half* dp = dc.data_ptr<at::Half>();
  const at::Half* mp = mc.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  int64_t r = 0;
  for (; r + kRowsAtOnce <= rows; r += kRowsAtOnce) run_rows<kRowsAtOnce>(w, dp, mp, qx, r, k, n, yp);
  switch (rows - r) {
    case 0: break;
    case 1: run_rows<1>(w, dp, mp, qx, r, k, n, yp); break;
    case 2: run_rows<2>(w, dp, mp, qx, r, k, n, yp); break;
    case 3: run_rows<3>(w, dp, mp, qx, r, k, n, yp); break;
    case 4: run_rows<4>(w, dp, mp, qx, r, k, n, yp); break;
    case 5: run_rows<5>(w, dp, mp, qx, r, k, n, yp); break;
    case 6: run_rows<6>(w, dp, mp, qx, r, k, n, yp); break;
    default: run_rows<7>(w, dp, mp, qx, r, k, n, yp); break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, lib) {
  lib.def("int4_linear(Tensor x, Tensor packed, Tensor d, Tensor m) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, lib) { lib.impl("int4_linear", int4_linear); }
