// Fused DINO cross-entropy loss, forward + gradient in one pass over the student logits (CPU).
//
// Math and its derivation: OPS_CONTRACT.md section 1, including the cancellation-free row loss
// L = n_t log S + sum_k Q(k) (M - x(k)) (M = max_k x(k), S = sum_k exp(x(k) - M)) computed here.
// Below, N = B * n_pairs.
//
// Design: the row kernels (teacher softmax with the teacher_sum pass, the block-wise student pass,
// the gradient write), the tasks, denormal flushing and determinism are those of softmax_rows.h,
// with n = n_t and grad_scale = 1 / (tau_s N). Specific to this op:
//   * parallel over samples b; each task owns a contiguous range of samples and a few rows of
//     float scratch: the G teacher softmaxes of the current sample, their sum (Q of the local
//     crops v >= G), a "sum of the others" row for G > 2, an exp row for non-float32 grads.
//   * n_t is the exact count G - 1 or G, not the computed sum of Q.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <memory>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "softmax_rows.h"

namespace fastdino {
namespace {

// Float row helpers for building Q (restrict: the rows never alias, so no runtime alias check).
FASTDINO_MULTIVERSION void add_rows(float* __restrict out, const float* __restrict a,
                                    const float* __restrict b, int64_t K) {
  for (int64_t k = 0; k < K; ++k) out[k] = a[k] + b[k];
}

FASTDINO_MULTIVERSION void add_row_inplace(float* __restrict out, const float* __restrict a,
                                           int64_t K) {
  for (int64_t k = 0; k < K; ++k) out[k] += a[k];
}

struct Problem {
  int64_t B, ncrops, G, K;
  float inv_tau_s, inv_tau_t, grad_scale;
};

// Processes samples [b0, b1): all their teacher and student rows. Writes the loss of student row
// r to row_loss[r] and adds the teacher rows into tsum. TG: the gradient's element type.
template <class TS, class TT, class TG>
void process_samples(const Problem& pb, const LossOperands<TS, TT, TG>& x, const float* center,
                     float* tsum, double* row_loss, int64_t b0, int64_t b1) {
  const int64_t K = pb.K, B = pb.B, G = pb.G;
  constexpr bool kGradIsFloat = std::is_same_v<TG, float>;
  // Scratch rows: P_0..P_{G-1}, then all = sum_i P_i (G >= 2), others = sum_{i != v} P_i
  // (G >= 3), exp row (non-float32 grad).
  const int64_t n_rows = G + (G >= 2) + (G >= 3) + (kGradIsFloat ? 0 : 1);
  std::unique_ptr<float[]> scratch(new float[n_rows * K]);
  std::unique_ptr<BlockStat[]> stats(new BlockStat[num_blocks(K)]);
  float* p = scratch.get();
  float* all = G >= 2 ? p + G * K : p;  // G == 1: Q of crops v >= 1 is P_0 itself
  float* others = G >= 3 ? p + (G + 1) * K : nullptr;
  float* exp_row = kGradIsFloat ? nullptr : p + (n_rows - 1) * K;

  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t i = 0; i < G; ++i) {
      teacher_softmax_row<TT, true>(x.teacher + (i * B + b) * K, center, K, pb.inv_tau_t,
                                    p + i * K, tsum, stats.get());
    }
    if (G >= 2) {
      add_rows(all, p, p + K, K);
      for (int64_t i = 2; i < G; ++i) add_row_inplace(all, p + i * K, K);
    }
    for (int64_t v = 0; v < pb.ncrops; ++v) {
      const int64_t row = v * B + b;
      storage_t<TG>* g_row = x.grad + row * K;
      const float* q;
      if (v >= G) {
        q = all;
      } else if (G == 1) {
        // The only global crop has no teacher crop to pair with: no loss, zero gradient.
        std::fill(g_row, g_row + K, Elem<TG>::store(0.0f));
        row_loss[row] = 0.0;
        continue;
      } else if (G == 2) {
        q = p + (1 - v) * K;
      } else {
        // Summed in i order rather than all - P_v, which would cancel badly where P_v dominates.
        const int64_t first = v == 0 ? 1 : 0;
        std::copy(p + first * K, p + (first + 1) * K, others);
        for (int64_t i = first + 1; i < G; ++i) {
          if (i != v) add_row_inplace(others, p + i * K, K);
        }
        q = others;
      }
      const float n_t = static_cast<float>(v < G ? G - 1 : G);
      float* e = exp_row_for<TG>(g_row, exp_row);
      const StudentRowSums sums =
          student_block_pass<TS>(x.student + row * K, e, q, K, pb.inv_tau_s, stats.get());
      row_loss[row] = write_student_grad<TG>(g_row, e, q, K, n_t, sums, pb.grad_scale,
                                             stats.get());
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dino_loss_forward(const at::Tensor& student,
                                                     const at::Tensor& teacher,
                                                     const at::Tensor& center,
                                                     const at::Tensor& grad,
                                                     int64_t n_global_crops, double student_temp,
                                                     double teacher_temp) {
  check_student_teacher_grad(student, teacher, grad, student_temp);
  const int64_t K = student.size(1);
  check_float32_vector(center, "center", K, "K");
  TORCH_CHECK(teacher_temp > 0, "fastdino: teacher_temp must be > 0, got ", teacher_temp);
  const int64_t G = n_global_crops;
  TORCH_CHECK(G >= 1, "fastdino: n_global_crops must be >= 1, got ", G);
  const int64_t R_t = teacher.size(0);
  const int64_t R_s = student.size(0);
  TORCH_CHECK(R_t > 0 && R_t % G == 0, "fastdino: teacher rows (", R_t,
              ") must be a positive multiple of n_global_crops (", G, ")");
  const int64_t B = R_t / G;
  TORCH_CHECK(R_s % B == 0, "fastdino: student rows (", R_s,
              ") must be a multiple of the batch size B = teacher rows / n_global_crops = ", B);
  const int64_t ncrops = R_s / B;
  TORCH_CHECK(ncrops >= G, "fastdino: student has ", ncrops,
              " crops per sample, fewer than n_global_crops = ", G);
  TORCH_CHECK(ncrops >= 2, "fastdino: student needs at least 2 crops per sample, got ", ncrops,
              " (with one crop there is no teacher/student pair)");
  TORCH_CHECK(at::get_overlap_status(grad, center) == at::MemOverlapStatus::No,
              "fastdino: grad must not overlap center");

  const int64_t n_pairs = G * ncrops - G;
  Problem pb;
  pb.B = B;
  pb.ncrops = ncrops;
  pb.G = G;
  pb.K = K;
  pb.inv_tau_s = static_cast<float>(1.0 / student_temp);
  pb.inv_tau_t = static_cast<float>(1.0 / teacher_temp);
  pb.grad_scale = static_cast<float>(1.0 / (student_temp * static_cast<double>(B * n_pairs)));

  std::vector<double> row_loss(R_s);
  const float* c = center.data_ptr<float>();
  at::Tensor teacher_sum = run_loss_tasks(
      student, teacher, grad, B, [&](const auto& operands, float* tsum, int64_t b0, int64_t b1) {
        process_samples(pb, operands, c, tsum, row_loss.data(), b0, b1);
      });
  at::Tensor loss = total_loss(row_loss, static_cast<double>(B * n_pairs), student);
  return std::make_tuple(loss, teacher_sum);
}

}  // namespace fastdino
