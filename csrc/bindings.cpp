// Python bindings of m2clip_fast._C. The GEMMs stay in Python (ATen → MKL/oneDNN); only the
// stencil passes, which ATen has no single kernel for, live here.
#include "ted_stencil.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "m2clip-fast CPU kernels: the TED-adapter stencil (forward and backward).";
  // Bumped whenever a signature below changes: ted_cpu refuses (and falls back from) a stale build.
  m.attr("ABI_VERSION") = 2;
  // The GIL is released: the kernels touch no Python objects and run OpenMP teams.
  m.def("ted_stencil_forward", &m2clip::ted_stencil_forward, py::arg("Z"), py::arg("Z_class"), py::arg("residual"),
        py::arg("down_e_b"), py::arg("conv_e_w"), py::arg("conv_e_b"), py::arg("down_d_b"), py::arg("conv_d_w"),
        py::arg("conv_d_b"), py::arg("up_e_b"), py::arg("up_d_b"), py::arg("T"), py::arg("h"), py::arg("w"),
        py::arg("s_buffer") = py::none(), py::call_guard<py::gil_scoped_release>(),
        "Z = x·[W_e; W_d]ᵀ without biases, either whole (B*T*L, 2r; Z_class None) or as its patch rows "
        "(B*T*h*w, 2r) with Z_class (B*T, r), the E half of its class rows (the class row has no D branch) → "
        "[S, out]: S = [S_e | S_d] (B*T*L, 2r; Z's dtype) and, when "
        "residual is given, out = residual + up_e.bias + [patch rows]·up_d.bias (residual's dtype). "
        "s_buffer: optional preallocated S.");
  m.def("ted_stencil_backward", &m2clip::ted_stencil_backward, py::arg("Z"), py::arg("Z_class"),
        py::arg("dS"), py::arg("grad"),
        py::arg("down_e_b"), py::arg("conv_e_w"), py::arg("conv_e_b"), py::arg("down_d_b"), py::arg("conv_d_w"),
        py::arg("conv_d_b"), py::arg("T"), py::arg("h"), py::arg("w"), py::arg("init_dx"),
        py::arg("s_buffer") = py::none(), py::arg("dz_buffer") = py::none(), py::call_guard<py::gil_scoped_release>(),
        "→ [S, dZ, dconv_e_w, dconv_e_b, ddown_e_b, dconv_d_w, dconv_d_b, ddown_d_b, dup_e_b, dup_d_b, dx_init]; "
        "small gradients in float32, dx_init = grad copy (or undefined unless init_dx). s_buffer / dz_buffer: "
        "optional preallocated S / dZ.");
  m.def("copy_serial_", &m2clip::copy_serial_, py::arg("dst"), py::arg("src"),
        py::call_guard<py::gil_scoped_release>(),
        "dst[...] = src for 2-D float32/bfloat16 tensors of any strides, single-threaded (weight-sized copies).");
  m.def("stencil_isa", &m2clip::stencil_isa, "Instruction set the stencil kernels currently use.");
  m.def("set_stencil_isa", &m2clip::set_stencil_isa, py::arg("name"),
        "Pin the stencil kernels to 'best', 'avx512', 'avx2' or 'baseline' (for tests and benchmarks).");
}
