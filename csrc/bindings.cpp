// Python bindings of the CPU backend (module fastdino._C). The GIL is released while the kernels
// run (they touch no Python object), so data-loader threads keep going during a training step.
#include <torch/extension.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdino C++ CPU kernels (fused DINO loss, list EMA update, per-parameter clipping).";

  m.def("dino_loss_forward", &fastdino::dino_loss_forward, py::arg("student"), py::arg("teacher"),
        py::arg("center"), py::arg("grad"), py::arg("n_global_crops"), py::arg("student_temp"),
        py::arg("teacher_temp"), py::call_guard<py::gil_scoped_release>(),
        R"doc(Fused DINO cross-entropy loss: forward value and gradient in one pass.

student: (ncrops * B, K) crop-major logits, float32 / bfloat16 / float16, contiguous.
teacher: (G * B, K) teacher logits (G = n_global_crops), any of the same dtypes.
center:  (K,) float32.
grad:    (ncrops * B, K), dtype of student; receives d loss / d student. May be student itself
         (in-place mode).
Returns (loss, teacher_sum): loss a 0-d float32 tensor (mean over the B * G * (ncrops - 1)
teacher/student pairs), teacher_sum the (K,) float32 column sum of teacher (for the center EMA).)doc");

  m.def("ema_update_", &fastdino::ema_update_, py::arg("teacher_tensors"),
        py::arg("student_tensors"), py::arg("momentum"), py::call_guard<py::gil_scoped_release>(),
        R"doc(In place, for every pair: teacher = momentum * teacher + (1 - momentum) * student.

Both lists: contiguous CPU tensors, float32 / bfloat16 / float16 (dtypes may differ within a
pair), pairwise equal numel. Computed in float32, rounded once to the teacher dtype.)doc");

  m.def("clip_grad_per_param_", &fastdino::clip_grad_per_param_, py::arg("grads"),
        py::arg("max_norm"), py::arg("eps") = 1e-6, py::call_guard<py::gil_scoped_release>(),
        R"doc(Per-tensor gradient clipping, in place.

For each g: norm = ||g||_2, coef = max_norm / (norm + eps), and g *= coef when coef < 1.
Returns the (len(grads),) float32 tensor of the norms before clipping.)doc");
}
