// Teacher EMA update over a whole parameter list: teacher <- m * teacher + (1 - m) * student.
// One parallel loop over ~64K-element chunks of all tensors (a per-tensor loop would run the
// many small tensors on one thread and pay a parallel region per tensor). Purely memory bound:
// each element is read from both lists and written once.
#include <ATen/ATen.h>

#include <string>

#include "cpu_math.h"
#include "ops.h"

namespace fastdino {
namespace {

template <class TT, class TS>
FASTDINO_MULTIVERSION void ema_range(storage_t<TT>* t, const storage_t<TS>* s, int64_t n, float m,
                                     float w) {
  // omp simd: vectorize without an aliasing check; t == s (same tensor in both lists) is safe.
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    t[k] = Elem<TT>::store(m * Elem<TT>::load(t[k]) + w * Elem<TS>::load(s[k]));
  }
}

using EmaFn = void (*)(void*, const void*, int64_t, float, float);

template <class TT, class TS>
void ema_erased(void* t, const void* s, int64_t n, float m, float w) {
  ema_range<TT, TS>(static_cast<storage_t<TT>*>(t), static_cast<const storage_t<TS>*>(s), n, m, w);
}

EmaFn ema_kernel(c10::ScalarType teacher_type, c10::ScalarType student_type) {
  return dispatch_float_type(teacher_type, [&](auto t_tag) {
    using TT = typename decltype(t_tag)::type;
    return dispatch_float_type(student_type, [&](auto s_tag) -> EmaFn {
      using TS = typename decltype(s_tag)::type;
      return &ema_erased<TT, TS>;
    });
  });
}

}  // namespace

void ema_update_(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
                 double momentum) {
  TORCH_CHECK(teacher.size() == student.size(), "fastdino: ema_update_ got ", teacher.size(),
              " teacher tensors but ", student.size(), " student tensors");
  const size_t n = teacher.size();
  std::vector<int64_t> numels(n);
  std::vector<EmaFn> kernels(n);
  std::vector<char*> t_ptr(n);
  std::vector<const char*> s_ptr(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string ti = "teacher_tensors[" + std::to_string(i) + "]";
    const std::string si = "student_tensors[" + std::to_string(i) + "]";
    check_cpu_float_tensor(teacher[i], ti);
    check_cpu_float_tensor(student[i], si);
    TORCH_CHECK(teacher[i].numel() == student[i].numel(), "fastdino: ", ti, " has ",
                teacher[i].numel(), " elements but ", si, " has ", student[i].numel());
    numels[i] = teacher[i].numel();
    kernels[i] = ema_kernel(teacher[i].scalar_type(), student[i].scalar_type());
    t_ptr[i] = static_cast<char*>(teacher[i].data_ptr());
    s_ptr[i] = static_cast<const char*>(student[i].data_ptr());
  }
  // The weights are rounded to float once, like the float32 arithmetic of the contract.
  const float m = static_cast<float>(momentum);
  const float w = static_cast<float>(1.0 - momentum);
  const std::vector<Chunk> chunks = make_chunks(numels);
  parallel_over_chunks(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const int64_t i = ch.tensor;
    kernels[i](t_ptr[i] + ch.begin * teacher[i].element_size(),
               s_ptr[i] + ch.begin * student[i].element_size(), ch.end - ch.begin, m, w);
  });
}

}  // namespace fastdino
