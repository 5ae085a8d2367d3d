// Decode attention over a paged KV cache, for CPU.
//
// One query token per sequence attends to its own cached tokens, found through its block table.
// Each (sequence, kv head) is one task: its G query heads share every K/V row they read, each row
// is read once, and nothing is gathered or padded. Torch-level batching needs a padded gather and
// small GEMMs instead, several times slower on CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Head dims known at compile time let the compiler keep a K/V row in vector registers.
template <int64_t kDim>
struct HeadDim {
  static constexpr int64_t value = kDim;
};

template <typename T, typename DimT>
void decode_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, double scale, int64_t window, DimT dim_t) {
  const int64_t dim = dim_t.value > 0 ? dim_t.value : query.size(2);
  const int64_t num_seqs = query.size(0), heads = query.size(1);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t groups = heads / kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t q_seq_stride = query.stride(0), q_head_stride = query.stride(1);
  const int64_t row_stride = kv_heads * dim;
  const T* q_ptr = query.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* o_ptr = out.data_ptr<T>();
  const float qk_scale = static_cast<float>(scale);

  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(groups * dim), acc(groups * dim), row(dim), scores, row_sum(groups);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / kv_heads, kv_head = task % kv_heads;
      const int64_t context = lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, context - window) : 0;
      const int64_t n = context - first;
      const int64_t* table = tables + seq * max_blocks;
      scores.resize(groups * n);
      for (int64_t g = 0; g < groups; ++g) {
        const T* src = q_ptr + seq * q_seq_stride + (kv_head * groups + g) * q_head_stride;
        for (int64_t d = 0; d < dim; ++d) q[g * dim + d] = static_cast<float>(src[d]) * qk_scale;
      }
      // Visit the context block by block: rows of one block are a fixed stride apart.
      auto for_each_row = [&](const T* cache, auto&& visit) {
        for (int64_t b = first / block_size; b * block_size < context; ++b) {
          const int64_t lo = std::max(first, b * block_size);
          const int64_t hi = std::min(context, (b + 1) * block_size);
          const T* base = cache + (table[b] * block_size * kv_heads + kv_head) * dim;
          for (int64_t pos = lo; pos < hi; ++pos) {
            const T* src = base + (pos - b * block_size) * row_stride;
            float* r = row.data();
            for (int64_t d = 0; d < dim; ++d) r[d] = static_cast<float>(src[d]);
            visit(pos - first, r);
          }
        }
      };
      for_each_row(k_ptr, [&](int64_t t, const float* r) {
        for (int64_t g = 0; g < groups; ++g) {
          const float* qg = q.data() + g * dim;
          float dot = 0.f;
          for (int64_t d = 0; d < dim; ++d) dot += qg[d] * r[d];
          scores[g * n + t] = dot;
        }
      });
      for (int64_t g = 0; g < groups; ++g) {
        float* s = scores.data() + g * n;
        float m = s[0];
        for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          s[t] = std::exp(s[t] - m);
          sum += s[t];
        }
        row_sum[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_row(v_ptr, [&](int64_t t, const float* r) {
        for (int64_t g = 0; g < groups; ++g) {
          const float p = scores[g * n + t];
          float* a = acc.data() + g * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] += p * r[d];
        }
      });
      for (int64_t g = 0; g < groups; ++g) {
        const float inv = 1.f / row_sum[g];
        T* dst = o_ptr + (seq * heads + kv_head * groups + g) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[g * dim + d] * inv);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale, int64_t window) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [seqs, heads, dim], dim-contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous [blocks, block_size, kv_heads, dim]");
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && v_cache.scalar_type() == query.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(query.size(2) == k_cache.size(3) && query.size(1) % k_cache.size(2) == 0,
              "query heads must be a multiple of kv heads, with the same head dim");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.size(0) == query.size(0),
              "block_tables must be contiguous int64 [seqs, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() &&
                  context_lens.numel() == query.size(0),
              "context_lens must be contiguous int64 [seqs]");
  at::Tensor out = at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    const int64_t dim = query.size(2);
    if (dim == 64) {
      decode_attention<scalar_t>(out, query, k_cache, v_cache, block_tables, context_lens, scale, window, HeadDim<64>{});
    } else if (dim == 128) {
      decode_attention<scalar_t>(out, query, k_cache, v_cache, block_tables, context_lens, scale, window, HeadDim<128>{});
    } else {
      decode_attention<scalar_t>(out, query, k_cache, v_cache, block_tables, context_lens, scale, window, HeadDim<0>{});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(continuum, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(continuum, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
