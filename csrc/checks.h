// Argument checks of the norm ops, shared by every backend (the update ops'
// one check is in update_op.h): each kernel calls them first, so a bad call
// fails with the same message on CPU and CUDA, and before anything is written.
#pragma once

#include <ATen/core/Tensor.h>

#include "update_op.h"

namespace fusedclip {

void check_norm_args(at::TensorList tensors, double norm_type);

}  // namespace fusedclip
