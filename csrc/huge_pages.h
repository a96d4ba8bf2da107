// Fresh tensors advised as transparent huge pages.
#pragma once

#include <torch/extension.h>

namespace torchntk {

// A fresh tensor whose whole 2 MiB pages are advised to be transparent huge
// pages (CPU, Linux; elsewhere a plain torch::empty): for large outputs
// written once, whose page faults cost more than the arithmetic.
torch::Tensor empty_huge_pages(at::IntArrayRef shape, const torch::TensorOptions& options);

}  // namespace torchntk
