// Fused DINO cross-entropy loss, forward + gradient in one pass over the student logits (CPU).
//
// Math and its derivation: OPS_CONTRACT.md section 1, including the cancellation-free row loss
// L = n_t log S + sum_k Q(k) (M - x(k)) (M = max_k x(k), S = sum_k exp(x(k) - M)) computed here.
// Below, N = B * n_pairs.
//
// Design (the op is memory bound on the student logits, and exp dominates the arithmetic):
//   * parallel over samples b; each task (one per thread) owns a contiguous range of samples and
//     a few rows of float scratch: the G teacher softmaxes of the current sample, their sum (Q of
//     the local crops v >= G), a "sum of the others" row for G > 2, an exp row for non-float32
//     grads, and its own teacher_sum accumulator, merged in task order at the end.
//   * teacher row: one pass reading t adds it to teacher_sum and writes y = (t - c) / tau_t to
//     the scratch row, block by block; then exp in place, then one scaling pass.
//   * student row: the row is cut in blocks of kBlock elements (L1-resident). Per block: the
//     block max m_b, then one pass computing e = exp(x - m_b) (the only exp of the element), the
//     block sums of e, of Q (m_b - x) and of Q. The blocks are combined with the
//     row max M at the end (factor exp(m_b - M) per block), so there is no second exp pass.
//     e is stored in grad itself for a float32 grad (in place: each element is read before it
//     is overwritten), else in a float scratch row; a last pass over the (L2-resident) row writes
//     grad = e * a_b - Q / (tau_s N) with a_b = n_t exp(m_b - M) / (S tau_s N).
//   * grad has the student's dtype or float32 (TG below): the op asks for float32 with float16
//     logits, whose gradient would underflow float16 before the loss scale reaches it.
//   * the tasks run with denormals flushed to zero (ScopedFlushDenormals): softmax makes many
//     values below FLT_MIN, and x86 microcode assists on them cost ~15% of the run time.
//   * determinism: sums in `omp simd` loops have an order fixed by the code and the vector width
//     of the clone the machine runs; no atomics. grad and the row losses (summed in row order)
//     do not depend on the thread count; teacher_sum does (its per-task partial sums), but is
//     bitwise reproducible for a given machine and thread count.
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

// P = softmax((t - c) / tau_t) into p; teacher_sum += t.
template <class T>
FASTDINO_MULTIVERSION void teacher_softmax_row(const storage_t<T>* t, const float* c, int64_t K,
                                               float inv_tau, float* p, float* tsum,
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
      tsum[k] += tv;
      const float y = (tv - c[k]) * inv_tau;
      p[k] = y;
      m = std::max(m, y);
    }
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = k0; k < k1; ++k) {
      const float e = exp_ps(p[k] - m);
      p[k] = e;
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
    for (int64_t k = k0; k < k1; ++k) p[k] *= a;
  }
}

// One student row: writes its gradient into g and returns its loss L (see the top of the file).
// e is float scratch of K elements; for a float32 g the caller passes g itself (e may alias g,
// and s too when the student is float32).
template <class T, class TG>
FASTDINO_MULTIVERSION double student_row(const storage_t<T>* s, storage_t<TG>* g, float* e,
                                         const float* q, int64_t K, float inv_tau, float n_t,
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
  for (int64_t blk = 0; blk < nb; ++blk) {
    stats[blk].factor = std::exp(stats[blk].max - row_max);
    total += static_cast<double>(stats[blk].sum) * stats[blk].factor;
    dist += static_cast<double>(stats[blk].qdist) +
            (static_cast<double>(row_max) - stats[blk].max) * stats[blk].qsum;
  }
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t k0 = blk * kBlock;
    const int64_t k1 = std::min(K, k0 + kBlock);
    const float a = static_cast<float>(n_t * stats[blk].factor / total * grad_scale);
#pragma omp simd
    for (int64_t k = k0; k < k1; ++k) g[k] = Elem<TG>::store(e[k] * a - q[k] * grad_scale);
  }
  return n_t * std::log(total) + dist;
}

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
void process_samples(const Problem& pb, const storage_t<TS>* student, storage_t<TG>* grad,
                     const storage_t<TT>* teacher, const float* center, float* tsum,
                     double* row_loss, int64_t b0, int64_t b1) {
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
      teacher_softmax_row<TT>(teacher + (i * B + b) * K, center, K, pb.inv_tau_t, p + i * K, tsum,
                              stats.get());
    }
    if (G >= 2) {
      add_rows(all, p, p + K, K);
      for (int64_t i = 2; i < G; ++i) add_row_inplace(all, p + i * K, K);
    }
    for (int64_t v = 0; v < pb.ncrops; ++v) {
      const int64_t row = v * B + b;
      const storage_t<TS>* s_row = student + row * K;
      storage_t<TG>* g_row = grad + row * K;
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
      float* e;
      if constexpr (kGradIsFloat) {
        e = g_row;
      } else {
        e = exp_row;
      }
      const float n_t = static_cast<float>(v < G ? G - 1 : G);
      row_loss[row] = student_row<TS, TG>(s_row, g_row, e, q, K, pb.inv_tau_s, n_t,
                                          pb.grad_scale, stats.get());
    }
  }
}

void check_matrix(const at::Tensor& t, const char* name) {
  check_cpu_float_tensor(t, name);
  TORCH_CHECK(t.dim() == 2, "fastdino: ", name, " must be 2-D (rows, K), got shape ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dino_loss_forward(const at::Tensor& student,
                                                     const at::Tensor& teacher,
                                                     const at::Tensor& center,
                                                     const at::Tensor& grad,
                                                     int64_t n_global_crops, double student_temp,
                                                     double teacher_temp) {
  check_matrix(student, "student");
  check_matrix(teacher, "teacher");
  check_matrix(grad, "grad");
  TORCH_CHECK(center.defined() && center.device().is_cpu(), "fastdino: center must be a CPU tensor");
  TORCH_CHECK(center.scalar_type() == at::kFloat, "fastdino: center must be float32, got ",
              center.scalar_type());
  TORCH_CHECK(center.dim() == 1 && center.is_contiguous(),
              "fastdino: center must be a contiguous 1-D tensor (K,), got shape ", center.sizes());
  const int64_t K = student.size(1);
  TORCH_CHECK(K > 0, "fastdino: student must have K > 0 columns");
  TORCH_CHECK(teacher.size(1) == K, "fastdino: teacher has ", teacher.size(1),
              " columns but student has K = ", K);
  TORCH_CHECK(center.size(0) == K, "fastdino: center has ", center.size(0),
              " elements but student has K = ", K);
  TORCH_CHECK(grad.sizes() == student.sizes(), "fastdino: grad must have the shape of student ",
              student.sizes(), ", got ", grad.sizes());
  const bool grad_is_float = grad.scalar_type() == at::kFloat;
  TORCH_CHECK(grad.scalar_type() == student.scalar_type() || grad_is_float,
              "fastdino: grad must have the dtype of student (", student.scalar_type(),
              ") or float32, got ", grad.scalar_type());
  TORCH_CHECK(student_temp > 0, "fastdino: student_temp must be > 0, got ", student_temp);
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
  const auto grad_vs_student = at::get_overlap_status(grad, student);
  TORCH_CHECK((grad_vs_student == at::MemOverlapStatus::Full &&
               grad.scalar_type() == student.scalar_type()) ||
                  grad_vs_student == at::MemOverlapStatus::No,
              "fastdino: grad must be either student itself (in place) or not overlap it");
  TORCH_CHECK(at::get_overlap_status(grad, teacher) == at::MemOverlapStatus::No,
              "fastdino: grad must not overlap teacher");
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

  auto fopts = student.options().dtype(at::kFloat);
  at::Tensor teacher_sum = at::zeros({K}, fopts);
  const int64_t ntasks = std::min<int64_t>(at::get_num_threads(), B);
  // Task 0 accumulates straight into teacher_sum, task t >= 1 into row t - 1 of `partial`.
  at::Tensor partial = at::zeros({ntasks - 1, K}, fopts);
  std::vector<double> row_loss(R_s);

  dispatch_float_type(student.scalar_type(), [&](auto s_tag) {
    using TS = typename decltype(s_tag)::type;
    dispatch_float_type(teacher.scalar_type(), [&](auto t_tag) {
      using TT = typename decltype(t_tag)::type;
      const auto* s = reinterpret_cast<const storage_t<TS>*>(student.data_ptr());
      const auto* t = reinterpret_cast<const storage_t<TT>*>(teacher.data_ptr());
      const float* c = center.data_ptr<float>();
      auto run = [&](auto g_tag) {
        using TG = typename decltype(g_tag)::type;
        auto* g = reinterpret_cast<storage_t<TG>*>(grad.data_ptr());
        at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
          const ScopedFlushDenormals flush_denormals;
          for (int64_t task = t0; task < t1; ++task) {
            float* tsum = task == 0 ? teacher_sum.data_ptr<float>()
                                    : partial.data_ptr<float>() + (task - 1) * K;
            process_samples<TS, TT, TG>(pb, s, g, t, c, tsum, row_loss.data(),
                                        task * B / ntasks, (task + 1) * B / ntasks);
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
  *loss_t.data_ptr<float>() = static_cast<float>(loss / static_cast<double>(B * n_pairs));
  return std::make_tuple(loss_t, teacher_sum);
}

}  // namespace fastdino
