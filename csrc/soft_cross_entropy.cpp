// Weighted row-wise soft cross-entropy, forward + gradient in one pass over the student logits
// (CPU): the iBOT masked-patch loss and DINOv2's DINO loss on given teacher probabilities.
//
// Math: OPS_CONTRACT.md section 4. Student row r is paired with teacher row j = r % R_t, and
//   L_r = n_r log S_r + sum_k Q_r(k) (M_r - x_r(k)),  grad_r = w_r (n_r softmax(x_r) - Q_r) / tau_s.
//
// Design (memory bound on the student logits; exp dominates the arithmetic), as dino_loss.cpp:
//   * work order: the student rows are visited teacher row by teacher row, u = j * n + i for
//     student row i * R_t + j (n = R_s / R_t copies of each teacher row). Each task (one per
//     thread) owns a contiguous range of u, so it builds the Q row of each of its teacher rows once
//     into a scratch row and uses it for all of that row's student rows in its range. A teacher row
//     split between two tasks is built by both (bitwise the same), but added to teacher_sum only by
//     the task that holds its first copy (i = 0): every teacher row is summed exactly once.
//   * Q row: logits mode, y = (t - c) / tau_t block by block while adding t into teacher_sum, exp
//     in place, one scaling pass; probs mode, one pass converting t to float32 (and adding it).
//   * student row: blocks of kBlock elements (L1-resident); per block its max m_b, then one pass
//     computing e = exp(x - m_b) (the only exp of the element) and the block sums of e, of
//     Q (m_b - x) and of Q (n_r comes out of the same pass). The blocks are combined with the row
//     max M (factor exp(m_b - M) each), and a last pass writes grad = e a_b - Q w / tau_s with
//     a_b = n_r exp(m_b - M) w / (S tau_s). e is kept in grad itself for a float32 grad (each
//     element is read before it is overwritten, so grad may be student), else in a scratch row.
//   * grad has the student's dtype or float32 (the ops layer asks for float32 with float16
//     logits, whose gradient underflows float16).
//   * denormals flushed in the tasks (ScopedFlushDenormals): softmax makes many values below
//     FLT_MIN and x86 microcode assists on them are slow.
//   * determinism: no atomics; `omp simd` sums have an order fixed by the code and the clone's
//     vector width. grad and the row losses (weighted, summed in row order) do not depend on the
//     thread count; teacher_sum (per-task partials merged in task order) is bitwise reproducible
//     for a given machine and thread count.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "cpu_math.h"
#include "ops.h"

namespace fastdino {
namespace {

// 2048 floats: the second pass re-reads the block's student values, Q and e from L1 (8 KB each)
// and the per-block overhead stays small (as in dino_loss.cpp).
constexpr int64_t kBlock = 2048;

inline int64_t num_blocks(int64_t K) { return (K + kBlock - 1) / kBlock; }

struct BlockStat {
  float max;     // m_b: max of x (student) or y (teacher) over the block
  float sum;     // sum of exp(x - m_b) over the block
  float qdist;   // sum of Q (m_b - x) over the block (student only)
  float qsum;    // sum of Q over the block (student only)
  float factor;  // exp(m_b - M), filled when the row is combined
};

// q = softmax((t - c) / tau_t); tsum += t when kAddToSum.
template <class T, bool kAddToSum>
FASTDINO_MULTIVERSION void teacher_softmax_row(const storage_t<T>* t, const float* c, int64_t K,
                                               float inv_tau, float* q, float* tsum,
                                               BlockStat* stats) {
  const int64_t nb = num_blocks(K);
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock;
    const int64_t k1 = std::min(K, k0 + kBlock);
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t k = k0; k < k1; ++k) {
      const float tv = Elem<T>::load(t[k]);
      if constexpr (kAddToSum) tsum[k] += tv;
      const float y = (tv - c[k]) * inv_tau;
      q[k] = y;
      m = std::max(m, y);
    }
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = k0; k < k1; ++k) {
      const float e = exp_ps(q[k] - m);
      q[k] = e;
      s += e;
    }
    stats[blk].max = m;
    stats[blk].sum = s;
    row_max = std::max(row_max, m);
  }
  double total = 0.0;
  for (int64_t blk = 0; blk < nb; ++blk) {
    stats[blk].factor = std::exp(stats[blk].max - row_max);
    total += static_cast<double>(stats[blk].sum) * stats[blk].factor;
  }
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock;
    const int64_t k1 = std::min(K, k0 + kBlock);
    const float a = static_cast<float>(stats[blk].factor / total);
#pragma omp simd
    for (int64_t k = k0; k < k1; ++k) q[k] *= a;
  }
}

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

// One student row: writes its gradient into g and returns its unweighted loss L (see the top of
// the file). e is float scratch of K elements; for a float32 g the caller passes g itself (e may
// alias g, and s too when the student is float32). grad_scale = w / tau_s.
template <class T, class TG>
FASTDINO_MULTIVERSION double student_row(const storage_t<T>* s, storage_t<TG>* g, float* e,
                                         const float* q, int64_t K, float inv_tau,
                                         float grad_scale, BlockStat* stats) {
  const int64_t nb = num_blocks(K);
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock;
    const int64_t k1 = std::min(K, k0 + kBlock);
    // max(s) * inv_tau == max(s * inv_tau) exactly (inv_tau > 0 and rounding is monotonic).
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t k = k0; k < k1; ++k) m = std::max(m, Elem<T>::load(s[k]));
    m *= inv_tau;
    float sum = 0.0f;
    float qdist = 0.0f;
    float qsum = 0.0f;
#pragma omp simd reduction(+ : sum, qdist, qsum)
    for (int64_t k = k0; k < k1; ++k) {
      const float xm = Elem<T>::load(s[k]) * inv_tau - m;  // x - m_b <= 0
      const float ex = exp_ps(xm);
      e[k] = ex;
      sum += ex;
      qdist -= q[k] * xm;
      qsum += q[k];
    }
    stats[blk] = {m, sum, qdist, qsum, 0.0f};
    row_max = std::max(row_max, m);
  }
  double total = 0.0;  // S
  double dist = 0.0;   // sum_k Q(k) (M - x(k))
  double n_r = 0.0;    // sum_k Q(k)
  for (int64_t blk = 0; blk < nb; ++blk) {
    stats[blk].factor = std::exp(stats[blk].max - row_max);
    total += static_cast<double>(stats[blk].sum) * stats[blk].factor;
    dist += static_cast<double>(stats[blk].qdist) +
            (static_cast<double>(row_max) - stats[blk].max) * stats[blk].qsum;
    n_r += stats[blk].qsum;
  }
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock;
    const int64_t k1 = std::min(K, k0 + kBlock);
    const float a = static_cast<float>(n_r * stats[blk].factor / total * grad_scale);
#pragma omp simd
    for (int64_t k = k0; k < k1; ++k) g[k] = Elem<TG>::store(e[k] * a - q[k] * grad_scale);
  }
  return n_r * std::log(total) + dist;
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
void process_range(const Problem& pb, const storage_t<TS>* student, storage_t<TG>* grad,
                   const storage_t<TT>* teacher, const float* center, const float* weights,
                   float* tsum, double* row_loss, int64_t u0, int64_t u1) {
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
    const storage_t<TT>* t_row = teacher + j * K;
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
      storage_t<TG>* g_row = grad + row * K;
      float* e;
      if constexpr (kGradIsFloat) {
        e = g_row;
      } else {
        e = exp_row;
      }
      const double w = weights[row];
      const float grad_scale = static_cast<float>(w / pb.tau_s);
      const double loss = student_row<TS, TG>(student + row * K, g_row, e, q, K, pb.inv_tau_s,
                                              grad_scale, stats.get());
      row_loss[row] = w * loss;
    }
  }
}

void check_matrix(const at::Tensor& t, const char* name) {
  check_cpu_float_tensor(t, name);
  TORCH_CHECK(t.dim() == 2, "fastdino: ", name, " must be 2-D (rows, K), got shape ", t.sizes());
}

void check_float32_vector(const at::Tensor& t, const char* name, int64_t size,
                          const char* size_name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), "fastdino: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastdino: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.size(0) == size, "fastdino: ", name,
              " must be a contiguous 1-D tensor of ", size_name, " = ", size,
              " elements, got shape ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> soft_cross_entropy_forward(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
    const at::Tensor& weights, const at::Tensor& grad, double student_temp, double teacher_temp,
    bool teacher_is_probs) {
  check_matrix(student, "student");
  check_matrix(teacher, "teacher");
  check_matrix(grad, "grad");
  const int64_t R_s = student.size(0);
  const int64_t R_t = teacher.size(0);
  const int64_t K = student.size(1);
  TORCH_CHECK(K > 0, "fastdino: student must have K > 0 columns");
  TORCH_CHECK(teacher.size(1) == K, "fastdino: teacher has ", teacher.size(1),
              " columns but student has K = ", K);
  TORCH_CHECK(R_t >= 1, "fastdino: teacher must have at least one row");
  TORCH_CHECK(R_s >= 1 && R_s % R_t == 0, "fastdino: student rows (", R_s,
              ") must be a positive multiple of teacher rows (", R_t, ")");
  if (!teacher_is_probs) check_float32_vector(center, "center", K, "K");
  check_float32_vector(weights, "weights", R_s, "student rows");
  TORCH_CHECK(grad.sizes() == student.sizes(), "fastdino: grad must have the shape of student ",
              student.sizes(), ", got ", grad.sizes());
  const bool grad_is_float = grad.scalar_type() == at::kFloat;
  TORCH_CHECK(grad.scalar_type() == student.scalar_type() || grad_is_float,
              "fastdino: grad must have the dtype of student (", student.scalar_type(),
              ") or float32, got ", grad.scalar_type());
  TORCH_CHECK(student_temp > 0, "fastdino: student_temp must be > 0, got ", student_temp);
  TORCH_CHECK(teacher_is_probs || teacher_temp > 0, "fastdino: teacher_temp must be > 0, got ",
              teacher_temp);
  const auto grad_vs_student = at::get_overlap_status(grad, student);
  TORCH_CHECK((grad_vs_student == at::MemOverlapStatus::Full &&
               grad.scalar_type() == student.scalar_type()) ||
                  grad_vs_student == at::MemOverlapStatus::No,
              "fastdino: grad must be either student itself (in place) or not overlap it");
  TORCH_CHECK(at::get_overlap_status(grad, teacher) == at::MemOverlapStatus::No,
              "fastdino: grad must not overlap teacher");
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

  auto fopts = student.options().dtype(at::kFloat);
  at::Tensor teacher_sum = at::zeros({K}, fopts);
  const int64_t ntasks = std::min<int64_t>(at::get_num_threads(), R_s);
  // Task 0 accumulates straight into teacher_sum, task t >= 1 into row t - 1 of `partial`.
  at::Tensor partial = at::zeros({ntasks - 1, K}, fopts);
  std::vector<double> row_loss(R_s);

  dispatch_float_type(student.scalar_type(), [&](auto s_tag) {
    using TS = typename decltype(s_tag)::type;
    dispatch_float_type(teacher.scalar_type(), [&](auto t_tag) {
      using TT = typename decltype(t_tag)::type;
      const auto* s = reinterpret_cast<const storage_t<TS>*>(student.data_ptr());
      const auto* t = reinterpret_cast<const storage_t<TT>*>(teacher.data_ptr());
      const float* c = teacher_is_probs ? nullptr : center.data_ptr<float>();
      const float* w = weights.data_ptr<float>();
      auto run = [&](auto g_tag) {
        using TG = typename decltype(g_tag)::type;
        auto* g = reinterpret_cast<storage_t<TG>*>(grad.data_ptr());
        at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
          const ScopedFlushDenormals flush_denormals;
          for (int64_t task = t0; task < t1; ++task) {
            float* tsum = task == 0 ? teacher_sum.data_ptr<float>()
                                    : partial.data_ptr<float>() + (task - 1) * K;
            process_range<TS, TT, TG>(pb, s, g, t, c, w, tsum, row_loss.data(),
                                      task * R_s / ntasks, (task + 1) * R_s / ntasks);
          }
        });
      };
      if (grad_is_float) {
        run(TypeTag<float>{});
      } else {
        run(TypeTag<TS>{});
      }
    });
  });

  if (ntasks > 1) {
    float* out = teacher_sum.data_ptr<float>();
    const float* part = partial.data_ptr<float>();
    at::parallel_for(0, K, 1 << 14, [&](int64_t k0, int64_t k1) {
      for (int64_t task = 1; task < ntasks; ++task) {
        const float* row = part + (task - 1) * K;
        for (int64_t k = k0; k < k1; ++k) out[k] += row[k];
      }
    });
  }
  double loss = 0.0;
  for (double l : row_loss) loss += l;
  at::Tensor loss_t = at::empty({}, fopts);
  *loss_t.data_ptr<float>() = static_cast<float>(loss);
  return std::make_tuple(loss_t, teacher_sum);
}

}  // namespace fastdino
