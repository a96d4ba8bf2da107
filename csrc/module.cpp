// The Python module torchntk._C.
#include "extension.h"
#include "huge_pages.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchntk's compiled kernels: diagonal_conv and its adjoint (CPU, and CUDA if "
            "built), and the fused Conv/Pool/ABRelu chain (CPU, and CUDA if built).";
  m.def("diagonal_conv", &torchntk::diagonal_conv, "(cov, k, stride, pad_low, pad_high, circular)",
        pybind11::arg("cov"), pybind11::arg("k"), pybind11::arg("stride"),
        pybind11::arg("pad_low"), pybind11::arg("pad_high"), pybind11::arg("circular"));
  m.def("diagonal_conv_transpose", &torchntk::diagonal_conv_transpose,
        "(grad, size, k, stride, pad_low, pad_high, circular): the adjoint of diagonal_conv",
        pybind11::arg("grad"), pybind11::arg("size"), pybind11::arg("k"), pybind11::arg("stride"),
        pybind11::arg("pad_low"), pybind11::arg("pad_high"), pybind11::arg("circular"));
  m.def("conv_chain_self", &torchntk::conv_chain_self,
        "(cov, steps, with_covariance) -> [cov_out or None, variances at each nonlinearity]; "
        "steps: records of torchntk.ops.conv_chain (AffineStep, PoolStep, ABReluStep)",
        pybind11::arg("cov"), pybind11::arg("steps"), pybind11::arg("with_covariance") = true);
  m.def("conv_chain_pairs", &torchntk::conv_chain_pairs,
        "(nngp, ntk, var1, var2, steps, symmetric) -> [nngp_out, ntk_out]; symmetric: the "
        "pairs of one batch with itself, (j, i) the transpose of (i, j)",
        pybind11::arg("nngp"), pybind11::arg("ntk"), pybind11::arg("var1"), pybind11::arg("var2"),
        pybind11::arg("steps"), pybind11::arg("symmetric") = false);
  m.def("empty_huge_pages",
        [](std::vector<int64_t> shape, const torch::Tensor& like) {
          return torchntk::empty_huge_pages(shape, like.options());
        },
        "(shape, like) -> an uninitialized tensor of like's dtype and device, advised as huge "
        "pages", pybind11::arg("shape"), pybind11::arg("like"));
#ifdef TORCHNTK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
