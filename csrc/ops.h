// The ops of fastdino._C (see OPS_CONTRACT.md) and the small helpers their .cpp files share:
// argument checks and the chunked parallel loop over a list of tensors.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_math.h"

namespace fastdino {

std::tuple<at::Tensor, at::Tensor> dino_loss_forward(const at::Tensor& student,
                                                     const at::Tensor& teacher,
                                                     const at::Tensor& center,
                                                     const at::Tensor& grad,
                                                     int64_t n_global_crops, double student_temp,
                                                     double teacher_temp);

void ema_update_(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
                 double momentum);

at::Tensor clip_grad_per_param_(const std::vector<at::Tensor>& grads, double max_norm,
                                double eps);

std::tuple<at::Tensor, at::Tensor> soft_cross_entropy_forward(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
    const at::Tensor& weights, const at::Tensor& grad, double student_temp, double teacher_temp,
    bool teacher_is_probs);

// Sinkhorn-Knopp passes (OPS_CONTRACT.md section 5).
at::Tensor sinkhorn_column_max(const at::Tensor& logits);
at::Tensor sinkhorn_exp_(const at::Tensor& logits, const at::Tensor& shift, double inv_temp,
                         const at::Tensor& out);
at::Tensor sinkhorn_row_scales(const at::Tensor& E, const at::Tensor& column_scale);
at::Tensor sinkhorn_column_sums(const at::Tensor& E, const at::Tensor& row_scale);
void sinkhorn_normalize_rows_(const at::Tensor& E, const at::Tensor& column_scale);

// Defined, on the CPU, contiguous, dtype float32 / bfloat16 / float16. `name` names the argument
// in the error message ("student", "teacher_tensors[3]", ...).
inline void check_cpu_float_tensor(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(t.defined(), "fastdino: ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "fastdino: ", name, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(is_supported_float_type(t.scalar_type()), "fastdino: ", name,
              " must have dtype float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastdino: ", name, " must be contiguous");
}

// A piece [begin, end) of tensor `tensor` of a list: the unit of work of the list ops.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// 64K elements: big enough that the per-chunk overhead (dispatch, loop set-up) is noise, small
// enough that a 44M-parameter model gives hundreds of chunks to balance over the threads.
constexpr int64_t kChunkElems = int64_t{1} << 16;

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t b = 0; b < numels[i]; b += kChunkElems) {
      chunks.push_back({static_cast<int64_t>(i), b, std::min(numels[i], b + kChunkElems)});
    }
  }
  return chunks;
}

// Runs f(c) for every chunk index c, on at::get_num_threads() threads (torch's pool, so
// torch.set_num_threads applies). Each thread gets one contiguous run of chunks holding about the
// same number of elements: a split by chunk count would be lopsided when the many small tensors
// (biases, norms) fall on one side. Which thread runs a chunk never affects results: callers
// write per-chunk outputs and reduce them in chunk order.
template <class F>
void parallel_over_chunks(const std::vector<Chunk>& chunks, const F& f) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  if (n == 0) return;
  int64_t total = 0;
  for (const Chunk& c : chunks) total += c.end - c.begin;
  const int64_t ntasks = std::min<int64_t>(at::get_num_threads(), n);
  // first[t] = first chunk of task t; chunk c belongs to task floor(start_c * ntasks / total).
  std::vector<int64_t> first(ntasks + 1, n);
  first[0] = 0;
  int64_t task = 0;
  int64_t start = 0;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t owner = static_cast<int64_t>(static_cast<double>(start) * ntasks / total);
    while (task < owner) first[++task] = c;
    start += chunks[c].end - chunks[c].begin;
  }
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t c = first[t]; c < first[t + 1]; ++c) f(c);
    }
  });
}

}  // namespace fastdino
