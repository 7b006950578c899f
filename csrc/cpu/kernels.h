// What one copy of the CPU kernels (capability.h) hands dispatch.cpp: plain
// function pointers. dispatch.cpp, compiled once for the baseline, registers
// them, so the templates that make an op's schema from its C++ type are
// instantiated there only, not once per vector set (the linker would keep
// one of those copies for all).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

#include "../update_op.h"
#include "fusedclip/rules.h"

namespace fusedclip::cpu {

template <class Rule>
struct AnyDriver;  // names update_op's type; never defined

// The type of every update op, whatever its rule and driver.
using UpdateKernel = decltype(&UpdateOp<::fusedclip::Adam, AnyDriver>::call);

#define FUSEDCLIP_COUNT_RULE(Rule) +1
constexpr int kNumRules = 0 FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_COUNT_RULE);
#undef FUSEDCLIP_COUNT_RULE

struct CpuKernels {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*norm)(at::TensorList, double) = nullptr;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*unit_norm)(at::TensorList,
                                                                          double) = nullptr;
  UpdateKernel update[kNumRules] = {};  // the rules of rules.h, in its order
};

}  // namespace fusedclip::cpu
