// What an update rule is: one torch-free header per rule (adam.h, sgd.h, ...,
// listed in rules.h) defines a traits type with this shape, and the generic
// drivers of every backend (cpu/update_cpu.cpp, cuda/update_cuda.cu) run it.
//
//   struct SomeRule {
//     // The op is fusedclip::<kName>_; kHyperNames lists its `hyper` values in
//     // order (the Python wrapper reads it through fusedclip::rule_hyperparameters).
//     static constexpr const char* kName = "some";
//     static constexpr const char* kHyperNames = "beta1,eps,...";
//     static constexpr int kNumHyper = ...;
//     // The names of its state lists and step counters, for error messages:
//     // one name per state list it can take (the most any variant keeps, so
//     // the drivers' arrays are sized by it: max_states in rules.h).
//     static constexpr const char* kStateNames = "exp_avgs,...";
//     static constexpr const char* kStepsName = "steps";
//     // When it keeps no state at all ("without momentum"), or nullptr: never.
//     static constexpr const char* kStatelessWhen = nullptr;
//
//     struct Hyper {                       // the op's hyperparameters
//       static Hyper from(const double* values);   // kNumHyper values, bools as 0/1
//       Invalid invalid() const;           // which one is invalid and why, if any
//       int num_states() const;            // state lists the op takes
//       bool uses_steps() const;           // one step counter per tensor
//     };
//     // Index of the second moment among the states, for the element-wise
//     // transforms that read it (grad_transform.h); -1: the rule keeps none.
//     static constexpr int kSecondMoment = -1;
//
//     template <typename T> struct Scalars {   // per-tensor numbers, folded once
//       template <typename U> Scalars<U> as() const;
//     };
//     // `step` is the tensor's count after this step's increment (0 without steps).
//     static Scalars<double> scalars(const Hyper&, double lr, double step);
//
//     // Calls f(Variant{}) with the variant the hyperparameters ask for; the
//     // variant's options are template parameters, never a branch per element.
//     template <typename F> static void dispatch(const Hyper&, F&& f);
//   };
//
//   struct Variant {
//     static constexpr int kStates = ...;  // state arrays beside param and grad:
//                                          // Hyper::num_states(), at most max_states
//     // One element (or one SIMD vector of them), in place. SCALAR_TAIL: the
//     // rounding of torch's scalar code (see scalar_tail_begin in cpu/lanes.h).
//     template <bool SCALAR_TAIL, typename T>
//     static void update(T& param, T grad, T* states, const Scalars<T>& s);
//   };
//
// A rule becomes an op of every backend by its lines in rules.h (which lists
// the rest a new rule needs: its optimizer, reference and tests).
#pragma once

namespace fusedclip {

// What Hyper::invalid() finds: the index (in kHyperNames) of an invalid
// hyperparameter and what it must be, or index -1 and a message about several;
// `must` null: all valid.
struct Invalid {
  int index = -1;
  const char* must = nullptr;
};

}  // namespace fusedclip
