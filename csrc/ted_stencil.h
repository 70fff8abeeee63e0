// Declarations of the CPU stencil kernels (defined in ted_stencil.cpp, bound in bindings.cpp).
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace m2clip {
std::vector<at::Tensor> ted_stencil_forward(const at::Tensor& Z, const c10::optional<at::Tensor>& Z_class,
                                            const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& down_e_b, const at::Tensor& conv_e_w,
                                            const at::Tensor& conv_e_b, const at::Tensor& down_d_b,
                                            const at::Tensor& conv_d_w, const at::Tensor& conv_d_b,
                                            const c10::optional<at::Tensor>& up_e_b,
                                            const c10::optional<at::Tensor>& up_d_b, int64_t T, int64_t h,
                                            int64_t w, const c10::optional<at::Tensor>& s_buffer);
std::vector<at::Tensor> ted_stencil_backward(const at::Tensor& Z, const c10::optional<at::Tensor>& Z_class,
                                             const at::Tensor& dS, const at::Tensor& grad,
                                             const at::Tensor& down_e_b, const at::Tensor& conv_e_w,
                                             const at::Tensor& conv_e_b, const at::Tensor& down_d_b,
                                             const at::Tensor& conv_d_w, const at::Tensor& conv_d_b, int64_t T,
                                             int64_t h, int64_t w, bool init_dx,
                                             const c10::optional<at::Tensor>& s_buffer,
                                             const c10::optional<at::Tensor>& dz_buffer);
void copy_serial_(const at::Tensor& dst, const at::Tensor& src);
std::string stencil_isa();
void set_stencil_isa(const std::string& name);
}  // namespace m2clip
