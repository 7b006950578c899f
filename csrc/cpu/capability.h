// The CPU kernels (csrc/cpu/*_cpu.cpp and the headers they alone include) are
// compiled once per vector set (setup.py: ATen's DEFAULT, AVX2 and AVX512
// builds, each with CPU_CAPABILITY and its compiler flags); dispatch.cpp
// registers the copy chosen when the library loads (cpu_tuning.h).
//
// Each copy lives in its own inline namespace, fusedclip::cpu::CPU_CAPABILITY,
// as ATen's native/cpu kernels do: an inline function or template that two
// copies both emit then has two names, where the linker would otherwise keep
// one body for all (an AVX-512 one, say, on a CPU without AVX-512, or
// scalar_tail_begin of the wrong width).
#pragma once

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu kernels are compiled once per vector set, with CPU_CAPABILITY defined (setup.py)"
#endif
