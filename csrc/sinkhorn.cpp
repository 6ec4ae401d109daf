// Single-rank passes of Sinkhorn-Knopp centering (DINOv2) over a float32 matrix E (R x K), CPU.
// Contract: OPS_CONTRACT.md section 5; fastdino/ops/sinkhorn.py runs the passes and the
// all-reduces between them.
//
// Column reductions (column max, the column sums of exp and of E v) run over tiles of
// kRowChunk rows x a column block: a tile streams its rows' segments past its column partial
// (L1/L2-resident). Long row segments stream best (the prefetchers follow long runs: 2048-column
// blocks were 1.5x slower than whole rows), so the block is as wide as kMaxColBlock allows,
// narrower only when the matrix would otherwise give fewer than kMinTiles tiles to share among
// the threads. Tiles of row chunk 0 write into the output, those of chunk c >= 1 into row c - 1
// of a partial buffer, and the chunks are merged in chunk order: the tiling and the reduction
// order depend on the shape alone, so results are bitwise the same for any thread count.
// Row reductions (row scales, normalization) run in parallel over rows, each row summed in
// blocks of kRowBlock (float32 within a block, double across blocks).
// A sum of n positive float32 terms errs by at most (n - 1) u relative (u = 2^-24). A row sum
// has at most 256 terms per float32 accumulator (a row block over >= 4 SIMD lanes): ~256 u in
// the worst case; a column sum 64 per chunk, then R / 64 chunk merges: (64 + R / 64) u, 6e-6
// for the R = 2458 rows of DINOv2's iBOT patches.
// All passes run with denormals flushed (ScopedFlushDenormals), like the loss kernels.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <limits>

#include "cpu_math.h"
#include "ops.h"

namespace fastdino {
namespace {

constexpr int64_t kMaxColBlock = 65536;  // 256 KB of float32 partials: L2-resident
constexpr int64_t kMinColBlock = 8192;  // 32 KB row segments: 8 pages of prefetched stream
// At least 32 tiles: R = 2458, K = 65536 runs as 39 whole-row tiles (2 threads: 20 + 19), R = 128
// as 2 x 8 tiles of 8192 columns.
constexpr int64_t kMinTiles = 32;
// 64 rows per chunk: R = 2458 (iBOT patches) gives 39 chunks, whose partial rows (38 x K floats)
// are 1.5% of the R x K pass they summarize.
constexpr int64_t kRowChunk = 64;
constexpr int64_t kRowBlock = 1024;
// Below this many elements per task the parallel region costs more than it saves.
constexpr int64_t kMinTaskElems = int64_t{1} << 15;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
FASTDINO_MULTIVERSION void column_max_tile(const storage_t<T>* x, int64_t ld, int64_t rows,
                                           int64_t n, float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const storage_t<T>* row = x + r * ld;
    // Not std::max: it takes the loaded value by reference, and gcc does not vectorize the
    // address-taken temporary under omp simd.
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const float v = Elem<T>::load(row[k]);
      dst[k] = v > dst[k] ? v : dst[k];
    }
  }
}

// out = exp((x - shift) * inv_temp), dst += out by column. out may be x itself (float32 x):
// every element is read before it is written.
template <class T>
FASTDINO_MULTIVERSION void exp_tile(const storage_t<T>* x, float* out, int64_t ld, int64_t rows,
                                    int64_t n, const float* __restrict shift, float inv_temp,
                                    float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const storage_t<T>* x_row = x + r * ld;
    float* out_row = out + r * ld;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const float e = exp_ps((Elem<T>::load(x_row[k]) - shift[k]) * inv_temp);
      out_row[k] = e;
      dst[k] += e;
    }
  }
}

FASTDINO_MULTIVERSION void weighted_column_sum_tile(const float* __restrict e, int64_t ld,
                                                    int64_t rows, int64_t n,
                                                    const float* __restrict row_scale,
                                                    float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = e + r * ld;
    const float v = row_scale[r];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dst[k] += row[k] * v;
  }
}

FASTDINO_MULTIVERSION void add_into(float* __restrict out, const float* __restrict part,
                                    int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] += part[k];
}

FASTDINO_MULTIVERSION void max_into(float* __restrict out, const float* __restrict part,
                                    int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = std::max(out[k], part[k]);
}

// sum_k e[k] u[k]: float32 within blocks of kRowBlock, double across them.
FASTDINO_MULTIVERSION double weighted_row_sum(const float* __restrict e,
                                              const float* __restrict u, int64_t K) {
  double total = 0.0;
  for (int64_t k0 = 0; k0 < K; k0 += kRowBlock) {
    const int64_t k1 = std::min(K, k0 + kRowBlock);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = k0; k < k1; ++k) s += e[k] * u[k];
    total += s;
  }
  return total;
}

FASTDINO_MULTIVERSION void scale_row(float* __restrict e, const float* __restrict u, float a,
                                     int64_t K) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) e[k] = e[k] * u[k] * a;
}

// 1 / sum, and 0 for a zero sum (a row that underflowed entirely contributes nothing).
inline float inverse_or_zero(double sum) {
  return sum == 0.0 ? 0.0f : static_cast<float>(1.0 / sum);
}

// The column reduction over an R x K matrix described at the top of the file: out (K floats) is
// filled with `identity`, tile(r0, r1, k0, k1, dst) reduces rows [r0, r1) of columns [k0, k1)
// into dst (k1 - k0 floats, pre-filled with identity), merge(out, part, n) folds a later chunk's
// partial row into out.
template <class Tile, class Merge>
void reduce_columns(int64_t R, int64_t K, float identity, float* out, const Tile& tile,
                    const Merge& merge) {
  std::fill(out, out + K, identity);
  const int64_t n_chunks = ceil_div(R, kRowChunk);
  if (n_chunks == 0 || K == 0) return;
  const int64_t n_blocks =
      std::clamp(ceil_div(kMinTiles, n_chunks), ceil_div(K, kMaxColBlock),
                 std::max<int64_t>(1, K / kMinColBlock));
  const int64_t col_block = ceil_div(ceil_div(K, n_blocks), 16) * 16;  // whole cache lines
  std::vector<float> partial((n_chunks - 1) * K, identity);
  const int64_t tile_elems = std::min(R, kRowChunk) * std::min(K, col_block);
  at::parallel_for(0, n_chunks * n_blocks, ceil_div(kMinTaskElems, tile_elems),
                   [&](int64_t i0, int64_t i1) {
                     const ScopedFlushDenormals flush_denormals;
                     for (int64_t i = i0; i < i1; ++i) {
                       const int64_t chunk = i / n_blocks;
                       const int64_t k0 = std::min(K, (i % n_blocks) * col_block);
                       const int64_t k1 = std::min(K, k0 + col_block);
                       const int64_t r0 = chunk * kRowChunk;
                       const int64_t r1 = std::min(R, r0 + kRowChunk);
                       float* dst = chunk == 0 ? out : partial.data() + (chunk - 1) * K;
                       tile(r0, r1, k0, k1, dst + k0);
                     }
                   });
  if (n_chunks == 1) return;
  at::parallel_for(0, K, std::max<int64_t>(kMinColBlock, kMinTaskElems / n_chunks),
                   [&](int64_t k0, int64_t k1) {
                     for (int64_t chunk = 1; chunk < n_chunks; ++chunk) {
                       merge(out + k0, partial.data() + (chunk - 1) * K + k0, k1 - k0);
                     }
                   });
}

// Runs f(r) for every row r in parallel; K: the row length (sets the grain).
template <class F>
void parallel_over_rows(int64_t R, int64_t K, const F& f) {
  at::parallel_for(0, R, ceil_div(kMinTaskElems, std::max<int64_t>(K, 1)),
                   [&](int64_t r0, int64_t r1) {
                     const ScopedFlushDenormals flush_denormals;
                     for (int64_t r = r0; r < r1; ++r) f(r);
                   });
}

void check_matrix(const at::Tensor& t, const char* name, bool float32_only) {
  check_cpu_float_tensor(t, name);
  TORCH_CHECK(!float32_only || t.scalar_type() == at::kFloat, "fastdino: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "fastdino: ", name, " must be 2-D (R, K), got shape ", t.sizes());
}

void check_vector(const at::Tensor& t, const char* name, int64_t size, const char* size_name,
                  const at::Tensor& matrix, const char* matrix_name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), "fastdino: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastdino: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.size(0) == size, "fastdino: ", name,
              " must be a contiguous 1-D tensor of ", size_name, " = ", size, " elements (",
              matrix_name, " has shape ", matrix.sizes(), "), got shape ", t.sizes());
}

// E, a float32 (R, K) matrix, and its float32 scale vector: one element per column of E
// (per_column, K elements) or per row (R elements).
void check_scaled_matrix(const at::Tensor& E, const at::Tensor& scale, const char* scale_name,
                         bool per_column) {
  check_matrix(E, "E", true);
  check_vector(scale, scale_name, E.size(per_column ? 1 : 0), per_column ? "K" : "R", E, "E");
}

}  // namespace

at::Tensor sinkhorn_column_max(const at::Tensor& logits) {
  check_matrix(logits, "logits", false);
  const int64_t R = logits.size(0);
  const int64_t K = logits.size(1);
  TORCH_CHECK(R >= 1, "fastdino: logits must have at least one row, got shape ", logits.sizes());
  at::Tensor m = at::empty({K}, logits.options().dtype(at::kFloat));
  dispatch_float_type(logits.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* x = reinterpret_cast<const storage_t<T>*>(logits.data_ptr());
    reduce_columns(
        R, K, -std::numeric_limits<float>::infinity(), m.data_ptr<float>(),
        [&](int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* dst) {
          column_max_tile<T>(x + r0 * K + k0, K, r1 - r0, k1 - k0, dst);
        },
        max_into);
  });
  return m;
}

at::Tensor sinkhorn_exp_(const at::Tensor& logits, const at::Tensor& shift, double inv_temp,
                         const at::Tensor& out) {
  check_matrix(logits, "logits", false);
  check_matrix(out, "out", true);
  const int64_t R = logits.size(0);
  const int64_t K = logits.size(1);
  TORCH_CHECK(out.sizes() == logits.sizes(), "fastdino: out must have the shape of logits ",
              logits.sizes(), ", got ", out.sizes());
  check_vector(shift, "shift", K, "K", logits, "logits");
  TORCH_CHECK(inv_temp > 0 && std::isfinite(inv_temp),
              "fastdino: inv_temp must be a positive finite number, got ", inv_temp);
  const auto out_vs_logits = at::get_overlap_status(out, logits);
  TORCH_CHECK((out_vs_logits == at::MemOverlapStatus::Full &&
               logits.scalar_type() == at::kFloat) ||
                  out_vs_logits == at::MemOverlapStatus::No,
              "fastdino: out must be either logits itself (float32, in place) or not overlap it");
  TORCH_CHECK(at::get_overlap_status(out, shift) == at::MemOverlapStatus::No,
              "fastdino: out must not overlap shift");

  at::Tensor column_sums = at::empty({K}, logits.options().dtype(at::kFloat));
  const float* sh = shift.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float it = static_cast<float>(inv_temp);
  dispatch_float_type(logits.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* x = reinterpret_cast<const storage_t<T>*>(logits.data_ptr());
    reduce_columns(
        R, K, 0.0f, column_sums.data_ptr<float>(),
        [&](int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* dst) {
          exp_tile<T>(x + r0 * K + k0, o + r0 * K + k0, K, r1 - r0, k1 - k0, sh + k0, it, dst);
        },
        add_into);
  });
  return column_sums;
}

at::Tensor sinkhorn_row_scales(const at::Tensor& E, const at::Tensor& column_scale) {
  check_scaled_matrix(E, column_scale, "column_scale", /*per_column=*/true);
  const int64_t R = E.size(0);
  const int64_t K = E.size(1);
  at::Tensor v = at::empty({R}, E.options());
  const float* e = E.data_ptr<float>();
  const float* u = column_scale.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  parallel_over_rows(R, K, [&](int64_t r) {
    vp[r] = inverse_or_zero(weighted_row_sum(e + r * K, u, K));
  });
  return v;
}

at::Tensor sinkhorn_column_sums(const at::Tensor& E, const at::Tensor& row_scale) {
  check_scaled_matrix(E, row_scale, "row_scale", /*per_column=*/false);
  const int64_t R = E.size(0);
  const int64_t K = E.size(1);
  at::Tensor c = at::empty({K}, E.options());
  const float* e = E.data_ptr<float>();
  const float* v = row_scale.data_ptr<float>();
  reduce_columns(
      R, K, 0.0f, c.data_ptr<float>(),
      [&](int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* dst) {
        weighted_column_sum_tile(e + r0 * K + k0, K, r1 - r0, k1 - k0, v + r0, dst);
      },
      add_into);
  return c;
}

void sinkhorn_normalize_rows_(const at::Tensor& E, const at::Tensor& column_scale) {
  check_scaled_matrix(E, column_scale, "column_scale", /*per_column=*/true);
  const int64_t R = E.size(0);
  const int64_t K = E.size(1);
  TORCH_CHECK(at::get_overlap_status(E, column_scale) == at::MemOverlapStatus::No,
              "fastdino: E must not overlap column_scale");
  float* e = E.data_ptr<float>();
  const float* u = column_scale.data_ptr<float>();
  parallel_over_rows(R, K, [&](int64_t r) {
    float* row = e + r * K;
    scale_row(row, u, inverse_or_zero(weighted_row_sum(row, u, K)), K);
  });
}

}  // namespace fastdino
