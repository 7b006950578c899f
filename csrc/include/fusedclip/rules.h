// Every update rule, once: ops.cpp defines an op fusedclip::<name>_ for each,
// and every backend registers its generic driver for each (cpu/update_cpu.cpp,
// cuda/update_cuda.cu); fusedclip/ops.py finds them through the op
// fusedclip::update_rules and registers each op's fake kernel.
//
// Adding a rule:
//   - csrc: its header, a traits type of the shape rule.h gives, and its
//     #include and X(...) line here. That makes its op, with a kernel on every
//     backend, the shared argument check and the schema; nothing else in csrc
//     changes (kMaxStates below follows from its kStateNames).
//   - Python: an optimizer class over it (fusedclip/optim/<name>.py, a
//     FusedClipOptimizer that calls ops.update_("<name>", ...)), exported from
//     fusedclip/optim/__init__.py and fusedclip/__init__.py, and its float64
//     formula in fusedclip/reference.py, the tests' oracle.
//   - tests: a RuleSpec in tests/registry.py's RULES (the op-level tests of
//     test_ops.py) and an OptimizerSpec in its SPECS (the optimizer-level ones).
#pragma once

#include <algorithm>

#include "fusedclip/adagrad.h"
#include "fusedclip/adam.h"
#include "fusedclip/lion.h"
#include "fusedclip/sgd.h"

// X(Rule) for each rule type.
#define FUSEDCLIP_FOR_EACH_RULE(X) \
  X(::fusedclip::Adam)             \
  X(::fusedclip::Sgd)              \
  X(::fusedclip::Adagrad)          \
  X(::fusedclip::Lion)

namespace fusedclip {

// The names in a comma-separated list.
constexpr int count_names(const char* list) {
  int n = 1;
  for (; *list != '\0'; ++list) n += *list == ',' ? 1 : 0;
  return n;
}

// The most state lists Rule's op takes: one per name of kStateNames (the
// argument check names each list it checks). The drivers static_assert that
// every variant keeps at most this many (Variant::kStates).
template <class Rule>
constexpr int max_states() {
  return count_names(Rule::kStateNames);
}

// The most state lists of any rule: what a driver's per-tensor array of state
// pointers must hold.
constexpr int max_states_of_all_rules() {
  int most = 0;
#define FUSEDCLIP_MAX_STATES(Rule) most = std::max(most, max_states<Rule>());
  FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_MAX_STATES)
#undef FUSEDCLIP_MAX_STATES
  return most;
}
constexpr int kMaxStates = max_states_of_all_rules();

}  // namespace fusedclip
