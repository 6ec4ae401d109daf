// Weighted row-wise soft cross-entropy, forward + gradient in one pass over the student logits
// (CPU): the iBOT masked-patch loss and DINOv2's DINO loss on given teacher probabilities.
//
// Math: OPS_CONTRACT.md section 4. Student row r is paired with teacher row j = r % R_t, and
//   L_r = n_r log S_r + sum_k Q_r(k) (M_r - x_r(k)),  grad_r = w_r (n_r softmax(x_r) - Q_r) / tau_s.
//
// Design: the row kernels (teacher softmax with the teacher_sum pass, the block-wise student pass,
// the gradient write), the tasks, denormal flushing and determinism are those of softmax_rows.h,
// with n = n_r (the sum of Q from the student pass) and grad_scale = w_r / tau_s. Specific to
// this op:
//   * work order: the student rows are visited teacher row by teacher row, u = j * n + i for
//     student row i * R_t + j (n = R_s / R_t copies of each teacher row). Each task owns a
//     contiguous range of u, so it builds the Q row of each of its teacher rows once into a
//     scratch row and uses it for all of that row's student rows in its range. A teacher row
//     split between two tasks is built by both (bitwise the same), but added to teacher_sum only
//     by the task that holds its first copy (i = 0): every teacher row is summed exactly once.
//   * Q row: logits mode, teacher_softmax_row; probs mode, one pass converting t to float32 (and
//     adding it to teacher_sum).
//   * the row losses are weighted by w_r before they are summed in row order.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <memory>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "softmax_rows.h"

namespace fastdino {
namespace {

// q = t as float32 (teacher probabilities); tsum += t when kAddToSum.
template <class T, bool kAddToSum>
FASTDINO_MULTIVERSION void teacher_probs_row(const storage_t<T>* t, int64_t K, float* q,
                                             float* tsum) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    const float tv = Elem<T>::load(t[k]);
    if constexpr (kAddToSum) tsum[k] += tv;
    q[k] = tv;
  }
}

struct Problem {
  int64_t R_s, R_t, K;
  int64_t copies;  // n = R_s / R_t student rows per teacher row
  float inv_tau_s, inv_tau_t;
  double tau_s;
  bool teacher_is_probs;
};

// Processes the student rows of work positions [u0, u1) (u = j * copies + i <-> student row
// i * R_t + j): writes their gradients and weighted losses (row_loss[row]) and adds the teacher
// rows whose first copy lies in the range into tsum. TG: the gradient's element type.
template <class TS, class TT, class TG>
void process_range(const Problem& pb, const LossOperands<TS, TT, TG>& x, const float* center,
                   const float* weights, float* tsum, double* row_loss, int64_t u0, int64_t u1) {
  const int64_t K = pb.K;
  constexpr bool kGradIsFloat = std::is_same_v<TG, float>;
  // Scratch rows: Q, then the exp row for a non-float32 grad.
  std::unique_ptr<float[]> scratch(new float[(kGradIsFloat ? 1 : 2) * K]);
  std::unique_ptr<BlockStat[]> stats(new BlockStat[num_blocks(K)]);
  float* q = scratch.get();
  float* exp_row = kGradIsFloat ? nullptr : scratch.get() + K;

  for (int64_t j = u0 / pb.copies; j * pb.copies < u1; ++j) {
    const int64_t i0 = std::max<int64_t>(0, u0 - j * pb.copies);
    const int64_t i1 = std::min(pb.copies, u1 - j * pb.copies);
    const storage_t<TT>* t_row = x.teacher + j * K;
    const bool add_to_sum = i0 == 0;
    if (pb.teacher_is_probs) {
      if (add_to_sum) {
        teacher_probs_row<TT, true>(t_row, K, q, tsum);
      } else {
        teacher_probs_row<TT, false>(t_row, K, q, nullptr);
      }
    } else if (add_to_sum) {
      teacher_softmax_row<TT, true>(t_row, center, K, pb.inv_tau_t, q, tsum, stats.get());
    } else {
      teacher_softmax_row<TT, false>(t_row, center, K, pb.inv_tau_t, q, nullptr, stats.get());
    }
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i * pb.R_t + j;
      storage_t<TG>* g_row = x.grad + row * K;
      const double w = weights[row];
      float* e = exp_row_for<TG>(g_row, exp_row);
      const StudentRowSums sums =
          student_block_pass<TS>(x.student + row * K, e, q, K, pb.inv_tau_s, stats.get());
      const double n_r = sums.qsum;
      row_loss[row] = w * write_student_grad<TG>(g_row, e, q, K, n_r, sums,
                                                 static_cast<float>(w / pb.tau_s), stats.get());
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> soft_cross_entropy_forward(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
    const at::Tensor& weights, const at::Tensor& grad, double student_temp, double teacher_temp,
    bool teacher_is_probs) {
  check_student_teacher_grad(student, teacher, grad, student_temp);
  const int64_t R_s = student.size(0);
  const int64_t R_t = teacher.size(0);
  const int64_t K = student.size(1);
  TORCH_CHECK(R_t >= 1, "fastdino: teacher must have at least one row");
  TORCH_CHECK(R_s >= 1 && R_s % R_t == 0, "fastdino: student rows (", R_s,
              ") must be a positive multiple of teacher rows (", R_t, ")");
  if (!teacher_is_probs) check_float32_vector(center, "center", K, "K");
  check_float32_vector(weights, "weights", R_s, "student rows");
  TORCH_CHECK(teacher_is_probs || teacher_temp > 0, "fastdino: teacher_temp must be > 0, got ",
              teacher_temp);
  TORCH_CHECK(at::get_overlap_status(grad, weights) == at::MemOverlapStatus::No,
              "fastdino: grad must not overlap weights");
  TORCH_CHECK(teacher_is_probs || at::get_overlap_status(grad, center) == at::MemOverlapStatus::No,
              "fastdino: grad must not overlap center");

  Problem pb;
  pb.R_s = R_s;
  pb.R_t = R_t;
  pb.K = K;
  pb.copies = R_s / R_t;
  pb.inv_tau_s = static_cast<float>(1.0 / student_temp);
  pb.inv_tau_t = teacher_is_probs ? 0.0f : static_cast<float>(1.0 / teacher_temp);
  pb.tau_s = student_temp;
  pb.teacher_is_probs = teacher_is_probs;

  std::vector<double> row_loss(R_s);
  const float* c = teacher_is_probs ? nullptr : center.data_ptr<float>();
  const float* w = weights.data_ptr<float>();
  at::Tensor teacher_sum = run_loss_tasks(
      student, teacher, grad, R_s, [&](const auto& operands, float* tsum, int64_t u0, int64_t u1) {
        process_range(pb, operands, c, w, tsum, row_loss.data(), u0, u1);
      });
  at::Tensor loss = total_loss(row_loss, 1.0, student);
  return std::make_tuple(loss, teacher_sum);
}

}  // namespace fastdino
