// Every update rule, once: ops.cpp defines an op fusedclip::<name>_ for each,
// and every backend registers its generic driver for each (cpu/update_cpu.cpp,
// cuda/update_cuda.cu). Adding a rule is its header and a line here.
#pragma once

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
