// Python bindings of the CPU backend (module fastdino._C). The GIL is released while the kernels
// run (they touch no Python object), so data-loader threads keep going during a training step.
#include <torch/extension.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "fastdino C++ CPU kernels (fused DINO loss, list EMA update, per-parameter clipping, "
      "weighted soft cross-entropy, Sinkhorn-Knopp passes).";

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

  m.def("soft_cross_entropy_forward", &fastdino::soft_cross_entropy_forward, py::arg("student"),
        py::arg("teacher"), py::arg("center"), py::arg("weights"), py::arg("grad"),
        py::arg("student_temp"), py::arg("teacher_temp"), py::arg("teacher_is_probs"),
        py::call_guard<py::gil_scoped_release>(),
        R"doc(Weighted row-wise soft cross-entropy (iBOT patch loss, DINO on given teacher probabilities):
forward value and gradient in one pass.

student: (R_s, K) logits, float32 / bfloat16 / float16, contiguous.
teacher: (R_t, K), any of the same dtypes, R_s a multiple of R_t; student row r is paired with
         teacher row r % R_t. Logits (Q = softmax((teacher - center) / teacher_temp)) or, with
         teacher_is_probs, the probabilities Q themselves (rows need not sum to 1).
center:  (K,) float32 (not read when teacher_is_probs).
weights: (R_s,) float32 row weights.
grad:    (R_s, K), dtype of student or float32; receives d loss / d student. May be student
         itself (in-place mode).
Returns (loss, teacher_sum): loss = sum_r weights[r] * CE(Q_r, softmax(student_r / student_temp))
(0-d float32), teacher_sum the (K,) float32 column sum of teacher.)doc");

  m.def("sinkhorn_column_max", &fastdino::sinkhorn_column_max, py::arg("logits"),
        py::call_guard<py::gil_scoped_release>(),
        R"doc(Column maxima of logits (R >= 1 rows, K columns; float32 / bfloat16 / float16): (K,) float32.)doc");

  m.def("sinkhorn_exp_", &fastdino::sinkhorn_exp_, py::arg("logits"), py::arg("shift"),
        py::arg("inv_temp"), py::arg("out"), py::call_guard<py::gil_scoped_release>(),
        R"doc(out = exp((logits - shift) * inv_temp) in float32; returns the (K,) float32 column sums of out.

logits: (R, K) float32 / bfloat16 / float16. shift: (K,) float32. inv_temp > 0.
out: (R, K) float32, may be logits itself (float32 logits: in place).)doc");

  m.def("sinkhorn_row_scales", &fastdino::sinkhorn_row_scales, py::arg("E"),
        py::arg("column_scale"), py::call_guard<py::gil_scoped_release>(),
        R"doc(v_r = 1 / sum_k E[r, k] * column_scale[k], and 0 where that sum is 0: (R,) float32.

E: (R, K) float32. column_scale: (K,) float32.)doc");

  m.def("sinkhorn_column_sums", &fastdino::sinkhorn_column_sums, py::arg("E"),
        py::arg("row_scale"), py::call_guard<py::gil_scoped_release>(),
        R"doc(c_k = sum_r E[r, k] * row_scale[r]: (K,) float32.

E: (R, K) float32. row_scale: (R,) float32.)doc");

  m.def("sinkhorn_normalize_rows_", &fastdino::sinkhorn_normalize_rows_, py::arg("E"),
        py::arg("column_scale"), py::call_guard<py::gil_scoped_release>(),
        R"doc(In place: E[r, k] = E[r, k] * column_scale[k] / sum_j E[r, j] * column_scale[j]; a row whose
sum is 0 becomes 0.

E: (R, K) float32. column_scale: (K,) float32.)doc");
}
