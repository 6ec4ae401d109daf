// Per-parameter gradient clipping over a whole list: norms, then in-place scaling of the tensors
// whose norm exceeds max_norm. Two parallel passes over ~64K-element chunks of all tensors; the
// sums of squares are per-chunk partials (double) reduced per tensor in chunk order, so the norms
// do not depend on the thread count.
#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "cpu_math.h"
#include "ops.h"

namespace fastdino {
namespace {

template <class T>
FASTDINO_MULTIVERSION double sum_squares(const storage_t<T>* g, int64_t n) {
  // Double accumulators: a 16M-element float32 tensor would lose digits in float lanes, and the
  // pass is memory bound, so the wider adds are free.
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) {
    const double v = Elem<T>::load(g[k]);
    acc += v * v;
  }
  return acc;
}

template <class T>
FASTDINO_MULTIVERSION void scale_range(storage_t<T>* g, int64_t n, float coef) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) g[k] = Elem<T>::store(Elem<T>::load(g[k]) * coef);
}

}  // namespace

at::Tensor clip_grad_per_param_(const std::vector<at::Tensor>& grads, double max_norm,
                                double eps) {
  const size_t n = grads.size();
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    check_cpu_float_tensor(grads[i], "grads[" + std::to_string(i) + "]");
    numels[i] = grads[i].numel();
  }
  at::Tensor norms = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return norms;

  const std::vector<Chunk> chunks = make_chunks(numels);
  std::vector<double> partial(chunks.size());
  parallel_over_chunks(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const at::Tensor& g = grads[ch.tensor];
    partial[c] = dispatch_float_type(g.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      return sum_squares<T>(static_cast<const storage_t<T>*>(g.data_ptr()) + ch.begin,
                            ch.end - ch.begin);
    });
  });

  std::vector<double> sumsq(n, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) sumsq[chunks[c].tensor] += partial[c];
  float* norms_out = norms.data_ptr<float>();
  std::vector<float> coef(n, 1.0f);
  std::vector<int64_t> clipped_numels(n, 0);  // 0: tensor left alone
  for (size_t i = 0; i < n; ++i) {
    const double norm = std::sqrt(sumsq[i]);
    norms_out[i] = static_cast<float>(norm);
    const double c = max_norm / (norm + eps);
    if (c < 1.0) {  // false for a NaN norm: such a tensor is left as it is
      coef[i] = static_cast<float>(c);
      clipped_numels[i] = numels[i];
    }
  }

  const std::vector<Chunk> scale_chunks = make_chunks(clipped_numels);
  parallel_over_chunks(scale_chunks, [&](int64_t c) {
    const Chunk& ch = scale_chunks[c];
    const at::Tensor& g = grads[ch.tensor];
    dispatch_float_type(g.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      scale_range<T>(static_cast<storage_t<T>*>(g.data_ptr()) + ch.begin, ch.end - ch.begin,
                     coef[ch.tensor]);
    });
  });
  return norms;
}

}  // namespace fastdino
