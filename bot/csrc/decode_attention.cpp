// One decode step's attention for every row of a batch, over float16 keys/values as stored.
//
// Each row owns a buffer [layers, 2, heads, capacity, head_dim] of float16 (bot/kvcache.py,
// RowKV). For one layer this writes every row's new key/value (fp32, rounded to float16) at
// the row's position and attends the row's query (one token) over its keys/values, reading
// each float16 once and converting it in registers (F16C): no widened copy of the history,
// one call for all rows and heads (split over torch's intra-op threads), scores and softmax
// in fp32. Built at first use by bot/decode_kernel.py; needs AVX2, FMA and F16C.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// exp for 8 floats: Cephes' expf (as in avx_mathfun), relative error ~1e-7 on [-88, 88].
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i n = _mm256_cvttps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load_half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

constexpr int kMaxVectors = 32;  // head_dim <= 256

// query [rows, heads, dim] fp32; new_kv [2, rows, heads, dim] fp32; bufs: one float16 buffer
// [layers, 2, heads, capacity, dim] per row; starts[r]: the new token's position in row r.
// Returns [rows, heads, dim] fp32.
torch::Tensor decode_attention(const torch::Tensor& query, const torch::Tensor& new_kv,
                               const std::vector<torch::Tensor>& bufs, int64_t layer,
                               const std::vector<int64_t>& starts, double scale) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == torch::kFloat32 &&
              query.is_contiguous(), "query: contiguous float32 [rows, heads, dim]");
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
  TORCH_CHECK(dim % 8 == 0 && dim / 8 <= kMaxVectors, "head_dim must be a multiple of 8, <= 256");
  TORCH_CHECK(new_kv.scalar_type() == torch::kFloat32 && new_kv.is_contiguous() &&
              new_kv.dim() == 4 && new_kv.size(0) == 2 && new_kv.size(1) == rows &&
              new_kv.size(2) == heads && new_kv.size(3) == dim, "new_kv: [2, rows, heads, dim]");
  TORCH_CHECK(static_cast<int64_t>(bufs.size()) == rows &&
              static_cast<int64_t>(starts.size()) == rows, "one buffer and start per row");
  int64_t longest = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const auto& b = bufs[r];
    TORCH_CHECK(b.scalar_type() == torch::kHalf && b.is_contiguous() && b.dim() == 5 &&
                b.size(1) == 2 && b.size(2) == heads && b.size(4) == dim &&
                layer >= 0 && layer < b.size(0), "row buffer: contiguous float16 [layers, 2, "
                "heads, capacity, dim]");
    TORCH_CHECK(starts[r] >= 0 && starts[r] < b.size(3), "start outside the row's buffer");
    longest = std::max(longest, starts[r] + 1);
  }
  auto out = torch::empty_like(query);
  const float* q_all = query.data_ptr<float>();
  const float* kv_new = new_kv.data_ptr<float>();
  float* out_all = out.data_ptr<float>();
  const int64_t nv = dim / 8;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(longest + 8));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / heads, h = i % heads;
      const auto& b = bufs[r];
      const int64_t capacity = b.size(3);
      auto* base = reinterpret_cast<uint16_t*>(b.data_ptr<at::Half>());
      uint16_t* keys = base + ((layer * 2 + 0) * heads + h) * capacity * dim;
      uint16_t* values = base + ((layer * 2 + 1) * heads + h) * capacity * dim;
      const int64_t start = starts[r], n = start + 1;
      const float* nk = kv_new + (r * heads + h) * dim;
      const float* nvv = kv_new + ((rows + r) * heads + h) * dim;
      for (int64_t v = 0; v < nv; ++v) {  // the new token's key and value, stored
        _mm_storeu_si128(reinterpret_cast<__m128i*>(keys + start * dim + 8 * v),
                         _mm256_cvtps_ph(_mm256_loadu_ps(nk + 8 * v), _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(values + start * dim + 8 * v),
                         _mm256_cvtps_ph(_mm256_loadu_ps(nvv + 8 * v), _MM_FROUND_TO_NEAREST_INT));
      }
      __m256 q[kMaxVectors];
      const float* qp = q_all + i * dim;
      for (int64_t v = 0; v < nv; ++v)
        q[v] = _mm256_mul_ps(_mm256_loadu_ps(qp + 8 * v), _mm256_set1_ps(fscale));
      float top = -std::numeric_limits<float>::infinity();
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {  // eight keys at a time: independent sums, one reduction
        __m256 a[8];
        for (int k = 0; k < 8; ++k) {
          const uint16_t* key = keys + (j + k) * dim;
          a[k] = _mm256_mul_ps(q[0], load_half8(key));
          for (int64_t v = 1; v < nv; ++v) a[k] = _mm256_fmadd_ps(q[v], load_half8(key + 8 * v), a[k]);
        }
        const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        const __m256 s8 = _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20),
                                        _mm256_permute2f128_ps(t0, t1, 0x31));
        _mm256_storeu_ps(&scores[j], s8);
        float lanes[8];
        _mm256_storeu_ps(lanes, s8);
        for (float x : lanes) top = std::max(top, x);
      }
      for (; j < n; ++j) {
        const uint16_t* key = keys + j * dim;
        __m256 acc = _mm256_mul_ps(q[0], load_half8(key));
        for (int64_t v = 1; v < nv; ++v) acc = _mm256_fmadd_ps(q[v], load_half8(key + 8 * v), acc);
        scores[j] = hsum(acc);
        top = std::max(top, scores[j]);
      }
      const __m256 topv = _mm256_set1_ps(top);
      __m256 sumv = _mm256_setzero_ps();
      for (j = 0; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(&scores[j]), topv));
        _mm256_storeu_ps(&scores[j], e);
        sumv = _mm256_add_ps(sumv, e);
      }
      float total = hsum(sumv);
      for (; j < n; ++j) {
        scores[j] = std::exp(scores[j] - top);
        total += scores[j];
      }
      __m256 acc[kMaxVectors];
      for (int64_t v = 0; v < nv; ++v) acc[v] = _mm256_setzero_ps();
      for (j = 0; j < n; ++j) {
        const __m256 p = _mm256_set1_ps(scores[j]);
        const uint16_t* val = values + j * dim;
        for (int64_t v = 0; v < nv; ++v) acc[v] = _mm256_fmadd_ps(p, load_half8(val + 8 * v), acc[v]);
      }
      const __m256 inv = _mm256_set1_ps(1.0f / total);
      float* op = out_all + i * dim;
      for (int64_t v = 0; v < nv; ++v) _mm256_storeu_ps(op + 8 * v, _mm256_mul_ps(acc[v], inv));
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention over float16 row buffers",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
