// What the two fused softmax cross-entropy ops of fastdino._C share: dino_loss.cpp (DINO's loss,
// OPS_CONTRACT.md section 1) and soft_cross_entropy.cpp (the weighted iBOT / DINOv2 loss, section
// 4). Both compute, for a student row x = s / tau_s against a teacher row Q (a teacher softmax, a
// sum of them, or given probabilities), the cancellation-free loss of section 1 and its gradient
//   L = n log S + sum_k Q(k) (M - x(k)),   grad = (n softmax(x) - Q) grad_scale,
// with M = max_k x(k), S = sum_k exp(x(k) - M) and n = sum_k Q(k); each op supplies n and
// grad_scale.
//
// Design (the ops are memory bound on the student logits, and exp dominates the arithmetic):
//   * rows are cut in blocks of kBlock elements (L1-resident). Each block keeps its max m_b and
//     its sums (BlockStat); the blocks are combined with the row max M at the end (factor
//     exp(m_b - M) per block), so every element is exponentiated once, in one pass.
//   * teacher row (teacher_softmax_row): one pass reading t adds it to teacher_sum (the center
//     update needs it, from the pass that reads the teacher) and writes y = (t - c) / tau_t to
//     the Q row, block by block; then exp in place, then one scaling pass.
//   * student row (student_block_pass): per block the max m_b, then one pass computing
//     e = exp(x - m_b) and the block sums of e, of Q (m_b - x) and of Q. e is kept in grad itself
//     for a float32 grad (exp_row_for: each element is read before it is overwritten, so grad may
//     be student), else in a float scratch row.
//   * gradient (write_student_grad): a last pass over the (L2-resident) row writes
//     grad = e a_b - Q grad_scale with a_b = n exp(m_b - M) grad_scale / S.
//   * grad has the student's dtype or float32: the ops layer asks for float32 with float16
//     logits, whose gradient would underflow float16 before the loss scale reaches it.
//   * tasks (run_loss_tasks): one per thread, each over a contiguous range of the op's rows with
//     a few rows of float scratch and its own teacher_sum accumulator, merged in task order. They
//     run with denormals flushed to zero (ScopedFlushDenormals): softmax makes many values below
//     FLT_MIN, and x86 microcode assists on them cost ~15% of the run time.
//   * determinism: sums in `omp simd` loops have an order fixed by the code and the vector width
//     of the clone the machine runs; no atomics. grad and the row losses (summed in row order)
//     do not depend on the thread count; teacher_sum does (its per-task partial sums), but is
//     bitwise reproducible for a given machine and thread count.
// The row kernels are templates marked FASTDINO_MULTIVERSION: each .cpp that instantiates one
// gets its target clones.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "ops.h"

namespace fastdino {

// 2048 floats: the second pass re-reads the block's student values from L1 (8 KB, plus 8 KB each
// of Q and e), and the per-block overhead (reduction set-up, stats) stays small.
constexpr int64_t kBlock = 2048;

inline int64_t num_blocks(int64_t K) { return (K + kBlock - 1) / kBlock; }

struct BlockStat {
  float max;     // m_b: max of x (student) or y (teacher) over the block
  float sum;     // sum of exp(x - m_b) over the block
  float qdist;   // sum of Q (m_b - x) over the block (student only)
  float qsum;    // sum of Q over the block (student only)
  float factor;  // exp(m_b - M), filled when the row is combined
};

// Returns the row max M of the block maxima and fills each block's factor exp(m_b - M).
FASTDINO_INLINE float combine_block_maxima(BlockStat* stats, int64_t nb) {
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t blk = 0; blk < nb; ++blk) row_max = std::max(row_max, stats[blk].max);
  for (int64_t blk = 0; blk < nb; ++blk) stats[blk].factor = std::exp(stats[blk].max - row_max);
  return row_max;
}

// S = sum over the blocks of (sum of exp(x - m_b)) exp(m_b - M), in double.
FASTDINO_INLINE double row_exp_sum(const BlockStat* stats, int64_t nb) {
  double total = 0.0;
  for (int64_t blk = 0; blk < nb; ++blk) {
    total += static_cast<double>(stats[blk].sum) * stats[blk].factor;
  }
  return total;
}

// Q row q = softmax((t - c) / tau_t) of teacher row t; tsum += t when kAddToSum.
template <class T, bool kAddToSum>
FASTDINO_MULTIVERSION void teacher_softmax_row(const storage_t<T>* t, const float* c, int64_t K,
                                               float inv_tau, float* q, float* tsum,
                                               BlockStat* stats) {
  const int64_t nb = num_blocks(K);
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
  }
  combine_block_maxima(stats, nb);
  const double total = row_exp_sum(stats, nb);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock;
    const int64_t k1 = std::min(K, k0 + kBlock);
    const float a = static_cast<float>(stats[blk].factor / total);
#pragma omp simd
    for (int64_t k = k0; k < k1; ++k) q[k] *= a;
  }
}

// max_k x[k] over [k0, k1), as float.
template <class T>
FASTDINO_INLINE float max_of(const storage_t<T>* x, int64_t k0, int64_t k1) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t k = k0; k < k1; ++k) m = std::max(m, Elem<T>::load(x[k]));
  return m;
}

// The row sums of a student pass.
struct StudentRowSums {
  double exp_sum;  // S
  double qdist;    // sum_k Q(k) (M - x(k))
  double qsum;     // sum_k Q(k)
};

// Where student_block_pass keeps e: in g itself for a float32 grad, else in `scratch`.
template <class TG>
FASTDINO_INLINE float* exp_row_for(storage_t<TG>* g, float* scratch) {
  if constexpr (std::is_same_v<TG, float>) {
    return g;
  } else {
    return scratch;
  }
}

// The block pass over student row s against Q row q: e = exp(x - m_b) into e (K floats, may
// alias s when the student is float32), the block stats into stats, and the row sums.
template <class T>
FASTDINO_MULTIVERSION StudentRowSums student_block_pass(const storage_t<T>* s, float* e,
                                                        const float* q, int64_t K, float inv_tau,
                                                        BlockStat* stats) {
  const int64_t nb = num_blocks(K);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock;
    const int64_t k1 = std::min(K, k0 + kBlock);
    // max(s) * inv_tau == max(s * inv_tau) exactly (inv_tau > 0 and rounding is monotonic).
    const float m = max_of<T>(s, k0, k1) * inv_tau;
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
  }
  const float row_max = combine_block_maxima(stats, nb);
  StudentRowSums sums{row_exp_sum(stats, nb), 0.0, 0.0};
  for (int64_t blk = 0; blk < nb; ++blk) {
    sums.qdist += static_cast<double>(stats[blk].qdist) +
                  (static_cast<double>(row_max) - stats[blk].max) * stats[blk].qsum;
    sums.qsum += stats[blk].qsum;
  }
  return sums;
}

// Writes the gradient of the row of the last student_block_pass (its e, stats and sums) into g
// (e may alias g) and returns the row loss L = n log S + sum_k Q(k) (M - x(k)). n exp(m_b - M) is
// rounded in Count's type: float for DINO's n_t (an exact count), double for a sum of Q.
template <class TG, class Count>
FASTDINO_MULTIVERSION double write_student_grad(storage_t<TG>* g, const float* e, const float* q,
                                                int64_t K, Count n, StudentRowSums sums,
                                                float grad_scale, const BlockStat* stats) {
  const int64_t nb = num_blocks(K);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock;
    const int64_t k1 = std::min(K, k0 + kBlock);
    const float a = static_cast<float>(n * stats[blk].factor / sums.exp_sum * grad_scale);
#pragma omp simd
    for (int64_t k = k0; k < k1; ++k) g[k] = Elem<TG>::store(e[k] * a - q[k] * grad_scale);
  }
  return n * std::log(sums.exp_sum) + sums.qdist;
}

inline void check_matrix(const at::Tensor& t, const char* name) {
  check_cpu_float_tensor(t, name);
  TORCH_CHECK(t.dim() == 2, "fastdino: ", name, " must be 2-D (rows, K), got shape ", t.sizes());
}

inline void check_float32_vector(const at::Tensor& t, const char* name, int64_t size,
                                 const char* size_name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), "fastdino: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastdino: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.size(0) == size, "fastdino: ", name,
              " must be a contiguous 1-D tensor of ", size_name, " = ", size,
              " elements, got shape ", t.sizes());
}

// The checks both ops make: student, teacher and grad are matrices of K > 0 columns; grad has
// the student's shape, its dtype or float32, and is student itself or disjoint from it, and
// disjoint from teacher; student_temp > 0.
inline void check_student_teacher_grad(const at::Tensor& student, const at::Tensor& teacher,
                                       const at::Tensor& grad, double student_temp) {
  check_matrix(student, "student");
  check_matrix(teacher, "teacher");
  check_matrix(grad, "grad");
  const int64_t K = student.size(1);
  TORCH_CHECK(K > 0, "fastdino: student must have K > 0 columns");
  TORCH_CHECK(teacher.size(1) == K, "fastdino: teacher has ", teacher.size(1),
              " columns but student has K = ", K);
  TORCH_CHECK(grad.sizes() == student.sizes(), "fastdino: grad must have the shape of student ",
              student.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == student.scalar_type() || grad.scalar_type() == at::kFloat,
              "fastdino: grad must have the dtype of student (", student.scalar_type(),
              ") or float32, got ", grad.scalar_type());
  TORCH_CHECK(student_temp > 0, "fastdino: student_temp must be > 0, got ", student_temp);
  const auto grad_vs_student = at::get_overlap_status(grad, student);
  TORCH_CHECK((grad_vs_student == at::MemOverlapStatus::Full &&
               grad.scalar_type() == student.scalar_type()) ||
                  grad_vs_student == at::MemOverlapStatus::No,
              "fastdino: grad must be either student itself (in place) or not overlap it");
  TORCH_CHECK(at::get_overlap_status(grad, teacher) == at::MemOverlapStatus::No,
              "fastdino: grad must not overlap teacher");
}

// The data of student, teacher and grad, typed by their element types TS, TT and TG.
template <class TS, class TT, class TG>
struct LossOperands {
  const storage_t<TS>* student;
  const storage_t<TT>* teacher;
  storage_t<TG>* grad;
};

// Runs an op's work items [0, n_items) as ntasks = min(threads, n_items) parallel tasks, task i
// calling run(operands, tsum, i * n_items / ntasks, (i + 1) * n_items / ntasks) with the
// LossOperands of the dtypes of student, teacher and grad (float32 or the student's) and tsum the
// task's float32 (K,) accumulator of teacher rows, zero-filled. Returns teacher_sum: the
// accumulators merged in task order.
template <class Run>
at::Tensor run_loss_tasks(const at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& grad, int64_t n_items, const Run& run) {
  const int64_t K = student.size(1);
  const auto fopts = student.options().dtype(at::kFloat);
  at::Tensor teacher_sum = at::zeros({K}, fopts);
  const int64_t ntasks = std::min<int64_t>(at::get_num_threads(), n_items);
  // Task 0 accumulates straight into teacher_sum, task t >= 1 into row t - 1 of `partial`.
  at::Tensor partial = at::zeros({ntasks - 1, K}, fopts);

  dispatch_float_type(student.scalar_type(), [&](auto s_tag) {
    using TS = typename decltype(s_tag)::type;
    dispatch_float_type(teacher.scalar_type(), [&](auto t_tag) {
      using TT = typename decltype(t_tag)::type;
      auto launch = [&](auto g_tag) {
        using TG = typename decltype(g_tag)::type;
        const LossOperands<TS, TT, TG> operands{
            reinterpret_cast<const storage_t<TS>*>(student.data_ptr()),
            reinterpret_cast<const storage_t<TT>*>(teacher.data_ptr()),
            reinterpret_cast<storage_t<TG>*>(grad.data_ptr())};
        at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
          const ScopedFlushDenormals flush_denormals;
          for (int64_t task = t0; task < t1; ++task) {
            float* tsum = task == 0 ? teacher_sum.data_ptr<float>()
                                    : partial.data_ptr<float>() + (task - 1) * K;
            run(operands, tsum, task * n_items / ntasks, (task + 1) * n_items / ntasks);
          }
        });
      };
      if (grad.scalar_type() == at::kFloat) {
        launch(TypeTag<float>{});
      } else {
        launch(TypeTag<TS>{});
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
  return teacher_sum;
}

// The op's loss: the row losses summed in row order, divided by divisor, as a 0-d float32 tensor.
inline at::Tensor total_loss(const std::vector<double>& row_loss, double divisor,
                             const at::Tensor& like) {
  double loss = 0.0;
  for (double l : row_loss) loss += l;
  at::Tensor loss_t = at::empty({}, like.options().dtype(at::kFloat));
  *loss_t.data_ptr<float>() = static_cast<float>(loss / divisor);
  return loss_t;
}

}  // namespace fastdino
